"""Runs train_orpo with faults injected, for the reliability tests (never imported by the trainer).

    python tests/fault_injection.py --config configs/tiny.yaml key=value ...   (or under accelerate launch)

Environment variables choose the fault:
    ORPO_KILL_AT_STEP=k         SIGKILL this process when step k+1 starts (step k and its checkpoint done)
    ORPO_KILL_IN=manifest       SIGKILL while sealing a checkpoint: a file half written, no manifest, no rename
    ORPO_KILL_IN=rename         SIGKILL after the manifest, just before the atomic rename
    ORPO_KILL_IN=prune          SIGKILL in the middle of deleting an old checkpoint
    ORPO_KILL_SAVE_NUMBER=n     which save the ORPO_KILL_IN fault hits (default 2)
    ORPO_SIGTERM_WHILE_SAVING=1 once a stop signal came, SIGTERM again while sealing its checkpoint (no manifest yet)
    ORPO_KILL_RANK=r            the ORPO_KILL_* faults hit this rank only (default: every rank)
    ORPO_SIGTERM_IN=phase       the process sends itself SIGTERM as a phase before or after the loop begins:
                                data (tokenising the training split), model (loading it), start_eval (the
                                evaluation at the start) or final_save (saving the trained model)
    ORPO_SIGTERM_RANK=r         ... on this rank only (default: every rank)
    ORPO_INF_STEPS=3,4          make one gradient infinite during these steps ...
    ORPO_NAN_LOSS_STEPS=3       add NaN to the backpropagated loss during these steps (its gradients stay finite) ...
    ORPO_INF_RANK=1             ... on this rank only (default 0), for both faults above
and what is recorded or left out:
    ORPO_WEIGHTS_DIGEST=dir     at the end, every rank writes dir/rank<r>.sha256: a digest of its final weights
    ORPO_STEP_DIGESTS=dir       at the start of step n+1, every rank writes dir/rank<r>-step<n>.sha256: a digest
                                of its own parameter storage (its shard under ZeRO-3) after step n
    ORPO_SKIP_PLOTS=1           no learning_curves.png (a second per checkpoint on the CPU; nothing here reads it)
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import accelerate  # noqa: E402
import torch  # noqa: E402

import orpo.checkpoint as checkpoint  # noqa: E402
import orpo.report as report  # noqa: E402
import train_orpo  # noqa: E402


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def install() -> None:
    env = os.environ
    steps_started = {"n": 0}
    real_count = train_orpo.nll_token_count
    kill_here = "ORPO_KILL_RANK" not in env or int(env["ORPO_KILL_RANK"]) == rank()

    def count_steps(*args, **kwargs):  # called once at the start of every optimizer step
        steps_started["n"] += 1
        if kill_here and "ORPO_KILL_AT_STEP" in env and steps_started["n"] == int(env["ORPO_KILL_AT_STEP"]) + 1:
            die()
        return real_count(*args, **kwargs)

    train_orpo.nll_token_count = count_steps

    where, saves = env.get("ORPO_KILL_IN") if kill_here else None, {"n": 0}
    target = int(env.get("ORPO_KILL_SAVE_NUMBER", "2"))
    real_manifest, real_replace = checkpoint.write_manifest, checkpoint.os.replace
    real_rmtree = checkpoint.shutil.rmtree

    def stopping() -> bool:  # the trainer's SIGTERM handler (a StopRequest) has recorded a signal
        handler = signal.getsignal(signal.SIGTERM)
        return getattr(getattr(handler, "__self__", None), "signal", None) is not None

    def manifest(directory: Path):
        saves["n"] += 1
        if env.get("ORPO_SIGTERM_WHILE_SAVING") == "1" and stopping():  # every file written, no manifest yet
            print(f"fault: SIGTERM while sealing {directory.name}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
        if where == "manifest" and saves["n"] == target:
            biggest = max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
            biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
            die()
        return real_manifest(directory)

    def replace(src, dst):
        if where == "rename" and saves["n"] == target and Path(src).name.startswith(".tmp-step_"):
            die()
        return real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        if where == "prune" and saves["n"] == target and Path(path).name.startswith("step_"):
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            for f in files[: max(1, len(files) // 2)]:
                f.unlink()
            die()
        return real_rmtree(path, *args, **kwargs)

    checkpoint.write_manifest, checkpoint.os.replace, checkpoint.shutil.rmtree = manifest, replace, rmtree

    phase = env.get("ORPO_SIGTERM_IN")
    if phase and ("ORPO_SIGTERM_RANK" not in env or int(env["ORPO_SIGTERM_RANK"]) == rank()):
        name = {"data": "load_data", "model": "load_model", "start_eval": "evaluate", "final_save": "save_trained"}[
            phase
        ]
        real_phase, fired = getattr(train_orpo, name), []

        def signalled(*args, **kwargs):  # SIGTERM as the phase starts; the phase then runs on
            if not fired:
                fired.append(True)
                print(f"fault: SIGTERM in {phase}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
            return real_phase(*args, **kwargs)

        setattr(train_orpo, name, signalled)

    inf_steps = {int(s) for s in env["ORPO_INF_STEPS"].split(",")} if "ORPO_INF_STEPS" in env else set()
    nan_loss_steps = {int(s) for s in env["ORPO_NAN_LOSS_STEPS"].split(",")} if "ORPO_NAN_LOSS_STEPS" in env else set()
    faulty_rank = int(env.get("ORPO_INF_RANK", "0"))
    step_digests = Path(env["ORPO_STEP_DIGESTS"]) if "ORPO_STEP_DIGESTS" in env else None
    if inf_steps or nan_loss_steps or step_digests:
        real_forward, seen = train_orpo.forward_orpo, {}

        def poison(grad: torch.Tensor) -> torch.Tensor:
            return torch.full_like(grad, float("inf")) if steps_started["n"] in inf_steps else grad

        def forward(model, batch, *args, **kwargs):
            if "model" not in seen:
                seen["model"] = model
                if rank() == faulty_rank and inf_steps:
                    param = next(p for p in model.parameters() if p.requires_grad)
                    param.register_hook(poison)  # this rank's gradient, before the all-reduce
            out = real_forward(model, batch, *args, **kwargs)
            if rank() == faulty_rank and steps_started["n"] in nan_loss_steps:
                out = out._replace(loss=out.loss + float("nan"))  # the loss only: its gradients stay finite
            return out

        train_orpo.forward_orpo = forward

    if step_digests:
        counted = train_orpo.nll_token_count

        def digest_then_count(*args, **kwargs):  # at the start of step n+1: the weights after step n
            if "model" in seen:
                digest = hashlib.sha256()
                for param in seen["model"].parameters():  # this rank's own storage (its shard under ZeRO-3)
                    own = getattr(param, "ds_tensor", param).detach()
                    digest.update(own.cpu().contiguous().view(torch.uint8).numpy().tobytes())
                step_digests.mkdir(parents=True, exist_ok=True)
                done = steps_started["n"]
                (step_digests / f"rank{rank()}-step{done}.sha256").write_text(digest.hexdigest())
            return counted(*args, **kwargs)

        train_orpo.nll_token_count = digest_then_count

    if "ORPO_WEIGHTS_DIGEST" in env:
        real_state_dict = accelerate.Accelerator.get_state_dict

        def state_dict_and_digest(self, model, unwrap=True):  # every rank calls it once, at the end
            digest = hashlib.sha256()
            for name, tensor in sorted(self.unwrap_model(model).state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            out = Path(env["ORPO_WEIGHTS_DIGEST"])
            out.mkdir(parents=True, exist_ok=True)
            (out / f"rank{rank()}.sha256").write_text(digest.hexdigest())
            return real_state_dict(self, model, unwrap)

        accelerate.Accelerator.get_state_dict = state_dict_and_digest

    if env.get("ORPO_SKIP_PLOTS") == "1":
        for module in (train_orpo, report):  # wherever the checkpoint's report looks it up
            if hasattr(module, "write_learning_curves"):
                module.write_learning_curves = lambda *args, **kwargs: None


if __name__ == "__main__":
    install()
    train_orpo.cli()
