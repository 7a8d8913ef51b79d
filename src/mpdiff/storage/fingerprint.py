"""Content fingerprints: what a resumed piece of work must match to be continued rather than redone."""

import hashlib

import torch


def tensors_digest(tensors):
    """sha256 of a state dict: each tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{str(t.dtype).replace('torch.', '')}|{list(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def network_fingerprint(net):
    """A network's identity: its class, configuration (when it has one) and the digest of its state."""
    config = getattr(net, "config", None)
    return {"class": type(net).__name__, "config": config.to_dict() if hasattr(config, "to_dict") else None,
            "state_sha256": tensors_digest(net.state_dict())}


def seeds_fingerprint(seeds):
    """A list of seeds in a few bytes: count, first, last and the sha256 of all of them in order."""
    seeds = [int(s) for s in seeds]
    digest = hashlib.sha256(",".join(map(str, seeds)).encode()).hexdigest()
    return {"count": len(seeds), "first": seeds[0] if seeds else None, "last": seeds[-1] if seeds else None,
            "sha256": digest}
