"""How the staged CUDA kernel's launch deals jobs to blocks (escoin_staged_launch), on the host:
the uneven form, where the first jobs' blocks fill whole rounds of the SMs and the rest (the
tail) run in more, shorter blocks, is chosen where the even form would leave some SMs a block
more than others, and keeps to its limits everywhere."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from escoin import EscoinError, _core

MAX_SPLITS = 16  # cuda/src/geometry.hpp: kGpuMaxSplits
H100 = (132, 4)  # SMs, and staged blocks an SM holds


def desc(batch: int, channels: int, out_channels: int, size: int, kernel: int = 3,
         stride: int = 1, padding: int = 1, groups: int = 1) -> tuple:
    return (batch, channels, size, size, out_channels, kernel, kernel, stride, stride,
            padding, padding, padding, padding, 1, 1, groups)


def blocks(launch: dict) -> int:
    """The uneven form's blocks: `splits` per lead job, tail_splits per tail job."""
    tail_jobs = launch["jobs"] - launch["lead_jobs"]
    return launch["lead_jobs"] * launch["splits"] + tail_jobs * launch["tail_splits"]


def check_limits(launch: dict, sms: int, per_sm: int) -> None:
    """Splits within the kernel's limit; the uneven form only where the even one leaves an SM
    short, its lead jobs' blocks as many whole rounds of the SMs as the even form fills (split
    only in blocks of one image), its tail split finer than the lead jobs with every split at
    least one chunk, and within one wave where the even form is one."""
    assert 1 <= launch["splits"] <= min(MAX_SPLITS, launch["chunks"])
    if launch["tail_splits"] == 0:
        return
    even_blocks = launch["jobs"] * launch["splits"]
    rounds = even_blocks // sms
    assert even_blocks % sms != 0
    assert launch["splits"] < launch["tail_splits"] <= min(MAX_SPLITS, launch["chunks"])
    assert launch["lead_jobs"] == rounds * sms // launch["splits"] > 0
    if launch["splits"] > 1:  # the reduction finds the tail's outputs by their place in y
        assert launch["images"] == 1
    if rounds < per_sm:
        assert math.ceil(blocks(launch) / sms) <= per_sm


@pytest.mark.parametrize("layer", [desc(1, 64, 64, 224), desc(32, 128, 128, 28),
                                   desc(32, 128, 128, 56, stride=2)])
def test_unsplit_grids_short_of_whole_rounds_split_their_tail(layer: tuple) -> None:
    """VGG's conv1_2 at batch 1 (400 jobs) and ResNet's conv2 3x3 layers at batch 32 (448 jobs)
    give an H100's 132 SMs 3-4 blocks each in the even form, unsplit: a block more on some SMs
    than on the rest. The uneven form runs three whole rounds of jobs and splits the few jobs
    left over, within the blocks an SM holds at once."""
    launch = _core.staged_launch(layer, *H100)
    assert launch["tail_splits"] >= 2
    check_limits(launch, *H100)


@pytest.mark.parametrize("layer, splits, tail_splits", [
    (desc(1, 128, 128, 112), 2, 8), (desc(1, 512, 512, 28), 4, 6)])
def test_split_grids_split_their_tail_finer(layer: tuple, splits: int,
                                            tail_splits: int) -> None:
    """VGG's conv2_2 and conv4_2 at batch 1 split every job (204 jobs in 2 blocks, 112 in 4):
    408 and 448 blocks, a block more on some of an H100's SMs than on the rest. The uneven form
    keeps the jobs whose blocks fill three whole rounds split as they were, and splits the few
    after them finer: conv2_2's 6 into 8 (one chunk each), conv4_2's 13 into 6 (as far as the
    workspace's partial-sum area, sized for the even form's 4 splits, has room)."""
    launch = _core.staged_launch(layer, *H100)
    assert (launch["splits"], launch["tail_splits"]) == (splits, tail_splits)
    check_limits(launch, *H100)


def test_a_tail_that_cannot_split_finer_keeps_the_even_form() -> None:
    """ResNet's conv4 3x3 at batch 1 runs its 16 chunks in 16 splits: no finer split exists."""
    launch = _core.staged_launch(desc(1, 512, 512, 7), *H100)
    assert launch["splits"] == 16 and launch["tail_splits"] == 0


@pytest.mark.parametrize("layer", [desc(32, 128, 128, 112), desc(32, 256, 256, 56)])
def test_large_batches_keep_the_even_form(layer: tuple) -> None:
    """At batch 32 these grids are many waves (their busiest SM within 1% of the mean) and the
    workspace has no partial-sum area: every job runs whole."""
    launch = _core.staged_launch(layer, *H100)
    assert launch["tail_splits"] == 0 and launch["splits"] == 1


def test_every_gpu_shape_keeps_the_limits() -> None:
    """Layers of the suite's kinds (3x3, 1x1, stride 2, grouped, small and large batches) on
    every GPU of 1-200 SMs and 1-8 blocks an SM: the limits hold, and the uneven form, with
    split lead jobs too, is actually among the launches checked."""
    layers = [desc(1, 64, 64, 224), desc(5, 64, 128, 40, 1, 1, 0), desc(3, 64, 24, 112, 1, 2, 0),
              desc(4, 64, 64, 56, groups=4), desc(32, 128, 128, 28), desc(1, 256, 256, 56)]
    uneven = split_lead = 0
    for layer in layers:
        for sms in range(1, 201):
            for per_sm in range(1, 9):
                launch = _core.staged_launch(layer, sms, per_sm)
                check_limits(launch, sms, per_sm)
                uneven += launch["tail_splits"] > 0
                split_lead += launch["tail_splits"] > 0 and launch["splits"] > 1
    assert uneven >= 500 and split_lead >= 100


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 40), channels=st.integers(1, 300), out_channels=st.integers(16, 300),
       size=st.integers(3, 120), kernel=st.sampled_from([1, 3, 5]), stride=st.integers(1, 2),
       sms=st.integers(1, 200), per_sm=st.integers(1, 8))
def test_every_launch_keeps_its_limits(batch: int, channels: int, out_channels: int, size: int,
                                       kernel: int, stride: int, sms: int, per_sm: int) -> None:
    """Whatever the geometry and GPU, the limits of check_limits hold."""
    layer = desc(batch, channels, out_channels, size, kernel, stride, kernel // 2)
    check_limits(_core.staged_launch(layer, sms, per_sm), sms, per_sm)


@pytest.mark.parametrize("sms, per_sm, message", [
    (0, 4, r"sms must be in \[1, 65536\], got 0"),
    (2**62, 4, r"sms must be in \[1, 65536\], got 4611686018427387904"),
    (132, 0, r"blocks_per_sm must be in \[1, 255\], got 0"),
    (132, 2**32, r"blocks_per_sm must be in \[1, 255\], got 4294967296")])
def test_a_gpu_shape_out_of_range_is_refused(sms: int, per_sm: int, message: str) -> None:
    """Out-of-range shapes are named, not multiplied: 2^62 SMs x 4 wrapped the product of the
    two to 0, which the launch then divided by."""
    with pytest.raises(EscoinError, match=message):
        _core.staged_launch(desc(1, 64, 64, 56), sms, per_sm)
