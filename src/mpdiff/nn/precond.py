"""EDM preconditioning: the denoiser D(x; sigma, c) around a raw network F (SPEC §1.1).

    D(x; sigma, c) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma), c)   (Eq. 4-8)

:func:`edm_coefficients` is the math. :class:`Preconditioner` applies it to any backbone called as
``backbone(x, noise_labels, class_labels) -> F_x`` and adds the log-variance head u(sigma) of the
uncertainty-weighted loss (Eq. 21) in the configs that have one (B-G). :class:`Precond` wraps the
U-Net of any ablation config: its constructor keywords are exactly the fields of
:class:`~mpdiff.config.NetworkConfig`.
"""

from typing import Optional

import torch
from torch import nn

from mpdiff.config import require
from mpdiff.nn.ladder import CONFIG_G, LadderFlags, Layers
from mpdiff.nn.unet import UNet

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def edm_coefficients(sigma: torch.Tensor, sigma_data: float):
    """(c_skip, c_out, c_in, c_noise) for noise levels `sigma` (Eq. 4-8).

    c_skip, c_out and c_in keep the shape of `sigma`; c_noise = ln(sigma) / 4 is flattened to one
    value per sample.
    """
    data_var = sigma_data ** 2
    total_var = sigma ** 2 + data_var  # variance of the noisy input
    total_std = total_var.sqrt()
    c_skip = data_var / total_var
    c_out = sigma * sigma_data / total_std
    c_in = 1 / total_std
    c_noise = sigma.log().flatten() / 4
    return c_skip, c_out, c_in, c_noise


class Preconditioner(nn.Module):
    """EDM preconditioning and uncertainty head around a backbone F (SPEC §1.1-1.2).

    Args:
        backbone: module called as backbone(x, noise_labels, class_labels) -> F_x, the U-Net or the
            UViT: ``self.backbone``. Its module name is ``unet`` whatever it is, because that name is the
            key prefix of every weight in NVIDIA's files and ours (``unet.enc.64x64_conv.weight``);
            renaming the module would rename every key of every network, checkpoint and EMA state.
        img_resolution, img_channels: the data's shape.
        label_dim: number of classes; 0 = unconditional (labels are then ignored).
        use_fp16: run the backbone in float16 on CUDA (the preconditioning stays float32).
        sigma_data: expected standard deviation of the data.
        logvar_channels: Fourier features of the log-variance head u(sigma).
        flags: the ablation config, which decides whether there is a head (LadderFlags.loss_uncertainty)
            and builds its layers like the backbone's; G by default.

    The head is u(sigma) = linear(Fourier(c_noise)) to one scalar (SPEC §1.2). In G its features are
    MP-Fourier and its linear layer an MPConv; in B-F both follow the config's conventions as SPEC §4.4
    states (plain Fourier features, a bias and A's init in B) (unconfirmed: the paper only says the
    head follows the current configuration). Config A has no head and no log-variance parameters.
    """

    def __init__(self, backbone: nn.Module, *, img_resolution: int, img_channels: int, label_dim: int = 0,
                 use_fp16: bool = True, sigma_data: float = 0.5, logvar_channels: int = 128,
                 flags: LadderFlags = CONFIG_G):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.precision = None  # runtime override of the activation dtype: see compute_dtype
        self.sigma_data = sigma_data
        self.unet = backbone
        self.logvar_fourier = self.logvar_linear = None
        if flags.loss_uncertainty:  # u(sigma): a scalar per noise level (Eq. 21)
            layers = Layers(flags)
            self.logvar_fourier = layers.fourier(logvar_channels)
            self.logvar_linear = layers.conv(logvar_channels, 1, kernel=())

    @property
    def backbone(self) -> nn.Module:
        """The raw network F (U-Net or UViT), registered under the file-format name ``unet``."""
        return self.unet

    def _labels(self, class_labels, device):
        """Labels as float32 [N, label_dim]; None for unconditional nets, zeros when missing."""
        if not self.label_dim:
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], device=device)
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def compute_dtype(self, device, force_fp32: bool = False) -> torch.dtype:
        """The backbone's activation dtype: `precision` when set (a runtime choice: 'fp32', 'bf16',
        'fp16'), else float16 on CUDA when the network says use_fp16, else float32. The
        preconditioning, the embedding, the norms inside normalisations, attention logits and the
        loss stay float32 whatever this is, and so do the weights (cast per use)."""
        if force_fp32:
            return torch.float32
        if self.precision is not None:
            return PRECISIONS[self.precision]
        return torch.float16 if self.use_fp16 and torch.device(device).type == "cuda" else torch.float32

    @property
    def has_uncertainty(self) -> bool:
        """Whether the network has the log-variance head u(sigma) (configs B-G)."""
        return self.logvar_linear is not None

    def log_variance(self, c_noise: torch.Tensor) -> Optional[torch.Tensor]:
        """u(sigma) as [N, 1, 1, 1], from c_noise = ln(sigma) / 4; None without the head (config A)."""
        if not self.has_uncertainty:
            return None
        u = self.logvar_linear(self.logvar_fourier(c_noise))
        return u.reshape(len(u), 1, 1, 1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                force_fp32: bool = False, return_logvar: bool = False):
        """D(x; sigma, class_labels) in float32; with return_logvar=True, (D, u(sigma) or None)."""
        x = x.to(torch.float32)
        sigma = sigma.float().reshape(-1, 1, 1, 1)  # one level per sample, broadcast over pixels
        labels = self._labels(class_labels, x.device)
        compute_dtype = self.compute_dtype(x.device, force_fp32)

        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        raw = self.backbone((c_in * x).to(compute_dtype), c_noise, labels)
        denoised = c_skip * x + c_out * raw.to(torch.float32)
        if not return_logvar:
            return denoised
        return denoised, self.log_variance(c_noise)


# NetworkConfig fields that only the UViT reads, and those of the U-Net that the UViT reads too.
UVIT_ONLY = ("patch_size", "depth", "mlp_ratio")
UVIT_SHARED = ("model_channels", "channels_per_head", "skip_scaling", "kappa", "kappa_rule")
BACKBONES = ("unet", "uvit")


class Precond(Preconditioner):
    """The denoiser of a :class:`~mpdiff.config.NetworkConfig`: :class:`Preconditioner` around its backbone.

    Keywords are the fields of :class:`~mpdiff.config.NetworkConfig` (``build_network`` passes
    ``config.to_dict()``). `backbone` 'unet' builds a :class:`~mpdiff.nn.unet.UNet` of ablation config
    `config` ('A' .. 'G', default G), which also shapes the uncertainty head; the fields not listed here
    go to the UNet and its blocks. 'uvit' builds a :class:`~mpdiff.nn.uvit.UViT` from the fields it
    reads (the U-Net's shape fields are ignored) with config G's uncertainty head.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = True,
                 sigma_data: float = 0.5, logvar_channels: int = 128, config: str = "G", backbone: str = "unet",
                 **options):
        require(backbone in BACKBONES, f"{{backbone}} {str(backbone)[:20]!r} is not one of {', '.join(BACKBONES)}",
                "backbone")
        shape = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim)
        # The backbone draws its random weights before the log-variance head does.
        if backbone == "unet":
            net = UNet(config=config, **shape, **{k: v for k, v in options.items() if k not in UVIT_ONLY})
            flags = net.flags
        else:
            require(config == "G", f"{{config}} {str(config)[:8]!r}: the ablation configs A-F are U-Net variants; "
                    f"a UViT takes none (leave config at G)", "config")
            from mpdiff.nn.uvit import UViT

            net = UViT(**shape, **{k: options[k] for k in UVIT_ONLY + UVIT_SHARED if k in options})
            flags = CONFIG_G
        super().__init__(net, use_fp16=use_fp16, sigma_data=sigma_data, logvar_channels=logvar_channels,
                         flags=flags, **shape)
