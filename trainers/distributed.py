"""Multi-process training set-up: what `rect-vlm train` does so that DDP and DeepSpeed ZeRO-2/3 runs work under
`torchrun`, `accelerate launch` (configs in `trainers/accelerate/`) or the `deepspeed` launcher, on GPUs and on CPUs
(gloo), without the user knowing the details.

On CPUs three things are needed, all done by `prepare_distributed` before `TrainingArguments` is built:

- the process group uses gloo (`ddp_backend="gloo"`; NCCL needs CUDA);
- DeepSpeed is told it runs on the CPU (`DS_ACCELERATOR=cpu`, set before `deepspeed` is imported);
- with a DeepSpeed config, Accelerate's process state is created first with the gloo backend and the Trainer is
  told to use it (`accelerator_config={"use_configured_state": True}`, `ACCELERATE_USE_DEEPSPEED=true`). Without
  that, transformers sees one process while DeepSpeed sees two, and the run fails with "train_batch_size is not
  equal to micro_batch_per_gpu * gradient_acc_step * world_size".

The shipped DeepSpeed configs (`trainers/deepspeed/zero2.json`, `zero3.json`) leave the optimizer to the Trainer
(`zero_allow_untested_optimizer`): `ReCTTrainer`'s per-module parameter groups (learning rates, weight decay) then
hold under ZeRO as they do without it, and no fused Adam extension has to be compiled. The rest of their values are
`"auto"`, filled in by the Trainer from `TrainingArguments`.

The final weights are saved through `Trainer.save_model`, which gathers ZeRO-3 partitions
(`stage3_gather_16bit_weights_on_model_save: true` in `trainers/deepspeed/zero3.json`) and writes on the main
process only, so a saved `model.safetensors` never holds the `[0]`-shaped placeholders ZeRO-3 leaves in each rank.

Under ZeRO-3 each parameter is partitioned as it is created. Models are therefore built with `_from_config` (which
initialises the partitioned weights as transformers does for `from_pretrained`), weights copied into a built model go
through `load_into` (gathered while they are written), and work after training that builds models again (the
multitask and localization exports) runs in a fresh process (`in_fresh_process`): `from_pretrained` in a process
where ZeRO-3 is active partitions the new model across ranks that are not there to take part, and waits forever.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any


#: The DeepSpeed configs shipped with the project (`--deepspeed zero2` or `zero3` names them).
DEEPSPEED_CONFIGS = {name: Path(__file__).parent / "deepspeed" / f"{name}.json" for name in ("zero2", "zero3")}

#: The Accelerate launch configs shipped with the project (`accelerate launch --config_file ...`).
ACCELERATE_CONFIGS = {path.stem: path for path in sorted((Path(__file__).parent / "accelerate").glob("*.yaml"))}


def world_size() -> int:
    """Processes in this run, as the launcher (torchrun, accelerate, deepspeed) tells them: `WORLD_SIZE`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_deepspeed(value: Any) -> str | None:
    """A DeepSpeed config argument → a JSON path: `zero2` / `zero3` name the shipped configs; None stays None.

    Raises:
        FileNotFoundError: a path that does not exist.
    """
    if value is None or value == "":
        return None
    if isinstance(value, dict):  # a config given inline (TrainingArguments accepts that too)
        return value
    if str(value) in DEEPSPEED_CONFIGS:
        return str(DEEPSPEED_CONFIGS[str(value)])
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(
            f"deepspeed: expected a DeepSpeed JSON config file or one of {sorted(DEEPSPEED_CONFIGS)}, found {value!r} "
            "(no such file)"
        )
    return str(path)


def prepare_distributed(deepspeed: Any, given: dict[str, Any]) -> dict[str, Any]:
    """Set the process up for the launcher it runs under; returns `TrainingArguments` keywords to add.

    Call it in every process before `TrainingArguments` is built. `deepspeed` is the resolved DeepSpeed config
    (None without DeepSpeed); `given` are the keywords the user set, which are never replaced.
    """
    import torch

    cuda = torch.cuda.is_available()
    extra: dict[str, Any] = {}
    if world_size() > 1 or deepspeed is not None:
        if not cuda:
            extra["ddp_backend"] = "gloo"
        # The project's models use every parameter in each forward: no extra autograd-graph traversal per step.
        extra["ddp_find_unused_parameters"] = False
    if deepspeed is not None:
        if not cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        from accelerate import PartialState

        PartialState(backend=given.get("ddp_backend") or extra.get("ddp_backend"))
        extra["accelerator_config"] = {"use_configured_state": True}
    return {k: v for k, v in extra.items() if k not in given}


def zero3_enabled() -> bool:
    """Whether the Trainer being set up in this process partitions parameters with DeepSpeed ZeRO-3."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


@contextlib.contextmanager
def gathered(module: Any) -> Iterator[None]:
    """Inside, `module`'s parameters are whole tensors on every rank under ZeRO-3, and what rank 0 writes into them
    is partitioned back on exit; without ZeRO-3 it does nothing."""
    if not zero3_enabled():
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
        yield


def state_dict_of(module: Any) -> dict[str, Any]:
    """`module.state_dict()` as whole tensors (copies), under ZeRO-3 too."""
    with gathered(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def load_into(module: Any, state_dict: Mapping[str, Any]) -> None:
    """`module.load_state_dict(state_dict)` (strict), also when ZeRO-3 has partitioned `module`'s parameters."""
    with gathered(module):
        module.load_state_dict(state_dict)


def in_fresh_process(function: Callable[..., None], *args: Any) -> None:
    """`function(*args)` here, or under ZeRO-3 in a spawned process of its own (see the module docstring); both
    must be picklable. The child's failure is raised here.

    Raises:
        RuntimeError: the child process failed (its traceback is in the log).
    """
    if not zero3_enabled():
        function(*args)
        return
    process = multiprocessing.get_context("spawn").Process(target=function, args=args)
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(
            f"{getattr(getattr(function, 'func', function), '__name__', function)} failed in its own process (exit "
            f"code {process.exitcode}); its traceback is above"
        )


def finish_distributed() -> None:
    """End of a `rect-vlm train` process: tear the process group down (`train_from_recipe` has already waited for
    every process, the main one writing the exports and the summary last).

    A process that exits with its gloo process group alive can abort in the interpreter's shutdown (`terminate called
    without an active exception`) and fail the launcher. Nothing happens in a single-process run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "ACCELERATE_CONFIGS",
    "DEEPSPEED_CONFIGS",
    "finish_distributed",
    "gathered",
    "in_fresh_process",
    "load_into",
    "prepare_distributed",
    "resolve_deepspeed",
    "state_dict_of",
    "world_size",
    "zero3_enabled",
]
