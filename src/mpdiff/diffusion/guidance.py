"""Guidance: mixing a main and a guide denoiser (SPEC §6.4)."""



def guided(net, guide=None, guidance=1.0):
    """D = w * D_net + (1 - w) * D_guide (SPEC §6.4): CFG with an unconditional guide, or
    autoguidance with a weaker conditional one. w = 1 (or no guide) skips the guide."""
    if guide is None or guidance == 1:
        return lambda x, sigma, labels: net(x, sigma, labels)
    return lambda x, sigma, labels: guide(x, sigma, labels).lerp(net(x, sigma, labels), guidance)
