"""Rewards loaded by `reward.callable` in the tests (module:attribute), as a user's plug-in would be."""

import numpy as np


def brightness(images, prompts):
    """Mean pixel value of each uint8 image [N, H, W, 3], plus the prompt's length (so the text reaches it)."""
    return images.reshape(len(images), -1).mean(axis=1) + np.array([len(p) for p in prompts])


class Counter:
    """A class: built once per reward, then called; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images, prompts):
        self.calls += 1
        return np.full(len(images), float(self.calls))


def one_nan(images, prompts):
    out = np.zeros(len(images))
    out[0] = np.nan
    return out


def too_few(images, prompts):
    return np.zeros(len(images) - 1)


def slow(images, prompts):
    """A reward that does not answer in time (continuation=best's timeout)."""
    import time

    time.sleep(60)
    return np.zeros(len(images))
