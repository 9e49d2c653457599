"""A run resumed on another process count continues the straight run's data stream: every step trains
on the very rows the uninterrupted run trained on (token contents of every rank's rows, compared step by step: no
document lost or repeated), with its losses within 1e-4, across a phase boundary (phases of 64- and 128-token
rows; SFT and DPO across an epoch boundary; GRPO's prompts). FSDP2 over gloo processes (torchrun); the distributed
checkpoint reshards model and optimizer, the data module redistributes the readers (moxin/data/reshard.py) or
rescales the step sampler's position (moxin/data/resume.py), the stage rescales the loop's micro-batch counters."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from moxin.checkpoint.files import CheckpointError
from moxin.checkpoint.resume import rescale_loop_batches
from moxin.config import DataError
from moxin.data.resume import rescale_sampler_position
from moxin.data.reshard import streams_of
import tests.helpers.two_source_corpus as T
from tests.conftest import torchrun

HELPER = Path(__file__).parent / "helpers" / "reshard_resume.py"
STEPS, RESUME_AT = 12, 3  # phase a is steps 1-6, phase b 7-12: the resumed part runs to the end of phase b


def _launch(world: int, out: Path, resume: str | None = None, workers: int = 0, stage: str = "pretrain",
            steps: int = STEPS) -> dict:
    args = [out / "rows.json", out / "run", steps, resume or "", workers, stage]
    torchrun(HELPER, *args, nproc=world)
    return json.loads((out / "rows.json").read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted runs by (process count, dataloader workers), launched once each and shared."""
    runs: dict[tuple[int, int], tuple[dict, Path]] = {}

    def get(world: int, workers: int = 0):
        if (world, workers) not in runs:
            out = tmp_path_factory.mktemp(f"straight{world}w{workers}")
            runs[world, workers] = _launch(world, out, workers=workers), out / "run" / "checkpoints"
        return runs[world, workers]
    return get


def _check_continues(straight_run: dict, resumed: dict, steps: int = STEPS, same_layout: bool = False) -> None:
    by_step = {s["step"]: s for s in straight_run["steps"]}
    assert [s["step"] for s in resumed["steps"]] == list(range(RESUME_AT + 1, steps + 1))
    assert same_layout or resumed["accumulate"] != straight_run["accumulate"]  # really another layout
    for s in resumed["steps"]:
        want = by_step[s["step"]]
        assert s["rows"] == want["rows"], f"step {s['step']}: other rows than the straight run's"
        if want["loss"] is not None:
            assert s["loss"] == pytest.approx(want["loss"], abs=1e-4), f"step {s['step']}"


@pytest.mark.parametrize("saved, resumed, workers", [
    (2, 1, 0),
    pytest.param(1, 2, 0, marks=pytest.mark.slow),
    pytest.param(2, 1, 2, marks=pytest.mark.slow),  # two dataloader workers a rank: 4 readers on one process
    pytest.param(4, 2, 0, marks=pytest.mark.slow),
    pytest.param(2, 4, 0, marks=pytest.mark.slow),
])
def test_resume_on_another_process_count_continues_the_straight_run(straight, tmp_path, saved, resumed, workers):
    run, ckpts = straight(saved, workers)
    again = _launch(resumed, tmp_path, str(ckpts / f"step{RESUME_AT:06d}.ckpt"), workers)
    _check_continues(run, again)


POST_STEPS = 8  # SFT: epochs of 5 steps, DPO: of 6: the resumed part crosses the epoch boundary


@pytest.mark.parametrize("stage, saved, resumed, workers", [
    ("sft", 2, 1, 0),
    pytest.param("sft", 1, 2, 1, marks=pytest.mark.slow),  # one dataloader worker a rank: torchdata's snapshot form
    pytest.param("dpo", 2, 1, 0, marks=pytest.mark.slow),
    pytest.param("grpo", 2, 1, 0, marks=pytest.mark.slow),
])
def test_post_training_resumes_on_another_process_count(tmp_path, stage, saved, resumed, workers):
    """SFT and DPO: the step sampler gives a global step the same items on any process count, and the saved loader
    position is rescaled to the new accumulation; GRPO: every rank takes its slice of the step's prompts (its loss
    depends on each rank's sampling: the prompts are compared)."""
    run = _launch(saved, tmp_path / "straight", workers=workers, stage=stage, steps=POST_STEPS)
    ckpt = tmp_path / "straight" / "run" / "checkpoints" / f"step{RESUME_AT:06d}.ckpt"
    again = _launch(resumed, tmp_path / "again", str(ckpt), workers, stage, POST_STEPS)
    # GRPO: one rollout a step on any process count (its accumulation stays 1)
    _check_continues(run, again, POST_STEPS, same_layout=stage == "grpo")


def test_a_step_samplers_position_moves_to_the_new_accumulation():
    one = {"_sampler_iter_yielded": 12, "_num_yielded": 12, "_index_sampler_state": None}
    rescale_sampler_position(one, 4, 2)
    assert one["_sampler_iter_yielded"] == one["_num_yielded"] == 6
    workers = {"_snapshot": {"_snapshot_step": 6, "_last_yielded_worker_id": 1,
                             "_main_snapshot": {"_num_workers": 2, "_sampler_iter_yielded": 6}},
               "_steps_since_snapshot": 0}
    rescale_sampler_position(workers, 2, 1)
    assert workers["_snapshot"]["_snapshot_step"] == workers["_snapshot"]["_main_snapshot"]["_sampler_iter_yielded"] == 3
    assert workers["_snapshot"]["_last_yielded_worker_id"] == 0  # batch 3 came from worker 0: worker 1 is next
    with pytest.raises(DataError, match="micro-batch 3, inside an optimizer step of 2"):
        rescale_sampler_position({"_sampler_iter_yielded": 3, "_num_yielded": 3}, 2, 1)


def test_streams_a_rank_reads_cover_its_share_of_each_step():
    # 4 micro-batches a step; saved by 2 ranks (2 each): one rank reads both streams, 4 ranks one half-stream each
    assert streams_of(0, 1, 4, 2) == [0, 1]
    assert [streams_of(r, 4, 4, 2) for r in range(4)] == [[0], [0], [1], [1]]
    assert [streams_of(r, 2, 6, 2) for r in range(2)] == [[0, 1], [1, 2]]  # 3 streams over 2 ranks: one shared


def test_loop_counters_rescaled_to_the_new_accumulation():
    ck = {"loops": {"fit_loop": {"epoch_loop.batch_progress": {
        "total": {"ready": 6, "started": 6, "processed": 6, "completed": 5},
        "current": {"ready": 2, "started": 2, "processed": 2, "completed": 1}}}}}
    rescale_loop_batches(ck, 2, 1)
    bp = ck["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert bp["total"] == {"ready": 3, "started": 3, "processed": 3, "completed": 2}
    assert bp["current"] == {"ready": 1, "started": 1, "processed": 1, "completed": 0}
    with pytest.raises(CheckpointError, match="micro-batch 3, inside an optimizer step of 2"):
        rescale_loop_batches(ck, 2, 4)  # 3 micro-batches are not whole steps of 2


@pytest.fixture
def corpus(tmp_path):
    """The two-source corpus of tests/helpers/two_source_corpus.py (its byte tokenizer's data modules, `T.make`)."""
    return T.write_corpus(tmp_path)


def _steps(dms: list, phases: range, stop_after: int | None = None, done: int = 0) -> list[list[str]]:
    """Per optimizer step, the sorted row hashes every rank (one data module each, in this process) yields;
    `done` steps of the first phase were taken before (a resume)."""
    out = []
    for ph in phases:
        loaders = [dm.build_train_loader(ph) for dm in dms]
        its = [iter(ld) for ld in loaders]
        accum = dms[0].accumulate_grad_batches
        for _ in range(dms[0].steps_in_phase(ph) - (done if ph == phases[0] else 0)):
            rows = []
            for ld, it in zip(loaders, its):
                for _ in range(accum):
                    rows += [hashlib.sha1(r.numpy().tobytes()).hexdigest() for r in next(it)["input_ids"]]
                    ld.consumed += 1
            out.append(sorted(rows))
            if stop_after is not None and len(out) == stop_after:
                return out
    return out


@pytest.mark.parametrize("saved, resumed, workers", [(2, 1, 0), (1, 2, 0), (2, 4, 0), (4, 2, 0), (2, 1, 2)])
def test_redistributed_readers_yield_the_straight_runs_rows(corpus, saved, resumed, workers):
    """The data module alone, every rank in this process: a stream saved by `saved` ranks mid-phase and resumed
    on `resumed` gives the straight run's rows in every later step, across the phase boundary."""
    phases = range(len(T.PHASES))
    straight = _steps([T.make(corpus, workers, world_size=saved, rank=r) for r in range(saved)], phases)
    first = [T.make(corpus, workers, world_size=saved, rank=r) for r in range(saved)]
    _steps(first, range(1), stop_after=RESUME_AT)
    readers = {}
    for dm in first:
        readers.update(dm.state_dict()["readers"])
    again = [T.make(corpus, workers, world_size=resumed, rank=r) for r in range(resumed)]
    for dm in again:
        dm.load_state_dict({"readers": readers, "phase": 0, "resharded": False, "pending_in_step": {}})
    assert _steps(again, phases, done=RESUME_AT) == straight[RESUME_AT:]
