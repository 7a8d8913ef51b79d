"""The pixel encoding: uint8 images <-> the values the network sees, [-1, 1] (SPEC §7.2).

This is the encoder seam of training and sampling: latent diffusion adds an encoder with the same
two methods (encode what the network is trained on, decode what it generates back to uint8).
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

    def encode(self, images_uint8):
        return encode_images(images_uint8)

    def decode(self, x):
        return decode_images(x)
