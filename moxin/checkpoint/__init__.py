"""Checkpoints of a run, one concern a module (torchtitan's `components/checkpoint` split the same way).

- `files`: what a checkpoint is on disk: names, the atomic single-file write, reading a checkpoint's header and
  checking that it is complete.
- `policy`: `CheckpointPolicy`, what is written when, what is kept, and ``last`` published only after a complete
  save.
- `async_save`: `AsyncCheckpointStrategy`, FSDP2's distributed checkpoints written in the background
  (``trainer.async_checkpoint``).
- `resume`: which checkpoint a run folder resumes from, leftovers of killed saves, model-config comparison.
- `weights`: a model's weights from any source (moxin checkpoint, distributed checkpoint, Hugging Face, safetensors,
  PEFT adapter).
- `export`: the Hugging Face folder from any strategy.
- `signals`: `StopOnSignal`, SIGUSR1 -> save at the step boundary, stop, requeue.
- `lock`: the run lock and `launcher_rank`, the one rank helper used before a process group exists.
"""
