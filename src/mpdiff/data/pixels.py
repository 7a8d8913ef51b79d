"""The pixel encoding: uint8 images <-> the values the network sees, [-1, 1] (SPEC §7.2).

This is the encoder seam of training and sampling: an encoder says how many channels the network
sees for a dataset's channel count (``channels``), encodes what the network is trained on
(``encode``) and decodes what it generates back to uint8 images (``decode``). Latent diffusion's
encoder (:class:`mpdiff.data.latents.LatentEncoder`) has the same methods.
"""

import torch


def encode_images(images_uint8):
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_uint8.to(torch.float32) / 127.5 - 1


def decode_images(x):
    """float [-1, 1] -> uint8 [0, 255], rounded to nearest."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


class PixelEncoder:
    """The identity encoder of pixel-space models: :func:`encode_images` and :func:`decode_images`."""
    name = "pixels"
    stochastic = False      # encode draws nothing: the same images give the same values
    can_decode = True

    def channels(self, data_channels):
        """The network's channel count for images of `data_channels` channels: the same."""
        return data_channels

    def encode(self, images_uint8, generator=None, eps=None):
        """uint8 images -> [-1, 1]; `generator` and `eps` are not used (the latent encoder's sample noise)."""
        return encode_images(images_uint8)

    def decode(self, x):
        return decode_images(x)

    def describe(self):
        """What a run's config.json records about the encoder."""
        return {"name": self.name, "encode": "x / 127.5 - 1 (uint8 -> [-1, 1])"}
