"""Defaults that fit a user's own data: the resolutions searched and the training batch size.

The paper's settings were made for CIFAR (32 px images, 45,000 training images). A dataset of
one's own may be 28 px images, or 1,200 of them: searched at 32–72 px it spends a short search on
upsampled pixels (a 72 px input holds 6.6 times the pixels of 28 px), and at batch 128 an
epoch of 1,200 images is 9 steps, too few to learn anything in a few epochs. Each rule returns its
value and the reason, which the log prints. The paper's configs and the quickstart name their own
values and keep them.
"""

from __future__ import annotations

from ..space_values import SpaceValues

DEFAULT_BATCH_SIZE = 128
"""The batch size of a search that does not fit it to the data (the paper's datasets)."""
MIN_STEPS = 100
"""Training steps per epoch a small dataset's default batch size leaves at least (down to SMALLEST_BATCH)."""
SMALLEST_BATCH = 16


def fitted_resolutions(image_size: int) -> tuple[tuple[int, ...], str]:
    """The input resolutions to search for images stored at ``image_size`` px, and why: in steps of 4
    from about the native size up to about twice it, within the paper's range (32…72)."""
    paper = SpaceValues().resolutions
    low, high, step = min(paper), max(paper), paper[1] - paper[0]

    def on_grid(px: float) -> int:
        return int(min(max(low + step * round((px - low) / step), low), high))

    start, stop = on_grid(image_size), on_grid(2 * image_size)
    chosen = tuple(range(start, stop + 1, step))
    return chosen, (f"images stored at {image_size} px: from about their size to about twice it, within the "
                    f"paper's {low}…{high}")


def fitted_batch_size(n_train: int) -> tuple[int, str]:
    """The training batch size for ``n_train`` training images, and why: :data:`DEFAULT_BATCH_SIZE`, halved
    while an epoch would have fewer than :data:`MIN_STEPS` steps (not below :data:`SMALLEST_BATCH`)."""
    batch = DEFAULT_BATCH_SIZE
    while batch > SMALLEST_BATCH and n_train / batch < MIN_STEPS:
        batch //= 2
    if batch == DEFAULT_BATCH_SIZE:
        return batch, f"{n_train} training images make {n_train // batch} steps an epoch at the default {batch}"
    steps = -(-n_train // batch)
    return batch, (f"{n_train} training images would make {-(-n_train // DEFAULT_BATCH_SIZE)} steps an epoch at "
                   f"{DEFAULT_BATCH_SIZE}; {batch} makes {steps} (aim: {MIN_STEPS}, smallest batch {SMALLEST_BATCH})")
