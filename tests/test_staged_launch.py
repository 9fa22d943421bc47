"""How the staged CUDA kernel's launch deals jobs to blocks (escoin_staged_launch), on the host:
the uneven form, where the first jobs fill whole rounds of the SMs and the rest (the tail) run
split, is chosen where the unsplit even form would leave some SMs a block more than others,
and keeps to its limits everywhere."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from escoin import EscoinError, _core

MAX_SPLITS = 16  # cuda/src/geometry.hpp: kGpuMaxSplits
H100 = (132, 4)  # SMs, and staged blocks an SM holds


def desc(batch: int, channels: int, out_channels: int, size: int, kernel: int = 3,
         stride: int = 1, padding: int = 1) -> tuple:
    return (batch, channels, size, size, out_channels, kernel, kernel, stride, stride,
            padding, padding, padding, padding, 1, 1, 1)


def blocks(launch: dict) -> int:
    """The uneven form's blocks: a block per lead job, tail_splits per tail job."""
    return launch["lead_jobs"] + (launch["jobs"] - launch["lead_jobs"]) * launch["tail_splits"]


@pytest.mark.parametrize("layer", [desc(1, 64, 64, 224), desc(32, 128, 128, 28),
                                   desc(32, 128, 128, 56, stride=2)])
def test_unsplit_grids_short_of_whole_rounds_split_their_tail(layer: tuple) -> None:
    """VGG's conv1_2 at batch 1 (400 jobs) and ResNet's conv2 3x3 layers at batch 32 (448 jobs)
    give an H100's 132 SMs 3-4 blocks each in the even form, unsplit: a block more on some SMs
    than on the rest. The uneven form runs three whole rounds of jobs and splits the few jobs
    left over, within the blocks an SM holds at once."""
    sms, per_sm = H100
    launch = _core.staged_launch(layer, sms, per_sm)
    assert launch["splits"] == 1 and 2 <= launch["tail_splits"] <= MAX_SPLITS
    assert launch["lead_jobs"] == launch["jobs"] // sms * sms
    assert launch["jobs"] // sms <= blocks(launch) // sms
    assert math.ceil(blocks(launch) / sms) <= per_sm


@pytest.mark.parametrize("layer", [desc(1, 128, 128, 112), desc(1, 512, 512, 28),
                                   desc(1, 512, 512, 7)])
def test_split_grids_keep_the_even_form(layer: tuple) -> None:
    """VGG's conv2_2 and conv4_2 and ResNet's conv4 3x3 at batch 1 split every job (2-16 ways):
    uneven, their lead jobs' partial sums would all go through the tail's finishing kernel,
    which cost 22 us on conv2_2 against the even form's 6 us reduction (measured on an H100)."""
    launch = _core.staged_launch(layer, *H100)
    assert launch["splits"] > 1 and launch["tail_splits"] == 0


@pytest.mark.parametrize("layer", [desc(32, 128, 128, 112), desc(32, 256, 256, 56)])
def test_large_batches_keep_the_even_form(layer: tuple) -> None:
    """At batch 32 these grids are many waves (their busiest SM within 1% of the mean) and the
    workspace has no partial-sum area: every job runs whole."""
    launch = _core.staged_launch(layer, *H100)
    assert launch["tail_splits"] == 0 and launch["splits"] == 1


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 40), channels=st.integers(1, 300), out_channels=st.integers(16, 300),
       size=st.integers(3, 120), kernel=st.sampled_from([1, 3, 5]), stride=st.integers(1, 2),
       sms=st.integers(1, 200), per_sm=st.integers(1, 8))
def test_every_launch_keeps_its_limits(batch: int, channels: int, out_channels: int, size: int,
                                       kernel: int, stride: int, sms: int, per_sm: int) -> None:
    """Whatever the geometry and GPU: splits within the kernel's limit; the uneven form only
    where the even one is unsplit and leaves an SM short, its lead jobs whole rounds of the
    SMs, and within one wave where the even form was."""
    layer = desc(batch, channels, out_channels, size, kernel, stride, kernel // 2)
    launch = _core.staged_launch(layer, sms, per_sm)
    assert 1 <= launch["splits"] <= MAX_SPLITS
    if launch["tail_splits"] > 0:
        assert launch["splits"] == 1 and launch["jobs"] % sms != 0
        assert 2 <= launch["tail_splits"] <= MAX_SPLITS
        assert launch["lead_jobs"] == launch["jobs"] // sms * sms > 0
        if launch["jobs"] // sms < per_sm:  # one wave, no SM left fewer blocks than before
            assert launch["jobs"] // sms <= blocks(launch) // sms
            assert math.ceil(blocks(launch) / sms) <= per_sm


@pytest.mark.parametrize("sms, per_sm, name", [(0, 4, "sms"), (132, 0, "blocks_per_sm")])
def test_a_gpu_without_sms_or_blocks_is_refused(sms: int, per_sm: int, name: str) -> None:
    with pytest.raises(EscoinError, match=f"{name} must be at least 1, got 0"):
        _core.staged_launch(desc(1, 64, 64, 56), sms, per_sm)
