"""Runtime plumbing: distributed setup, device and precision, seeding and RNG state, logging,
atomic checkpoints, run directories, and the peak-FLOPs table behind MFU."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import logging.handlers
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from config import Config, ConfigError


# ---------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    # A CPU (gloo) group for small control messages such as "stop after this step": agreeing on
    # them every step then never waits for the GPU. None means the default group (already gloo).
    control_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_kind: str) -> Dist:
    """Reads torchrun's RANK/LOCAL_RANK/WORLD_SIZE; without them the run is one process."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    info = Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(info.local_rank)
        restart = elastic_restart_count()
        if restart and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's default static rendezvous keeps one store for every attempt, so restarted
            # workers would read the dead attempt's addresses and fail to connect. Give each
            # attempt keys of its own (harmless where the rendezvous made a fresh store).
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                  info.world_size, is_master=False)
            dist.init_process_group(backend=backend, store=dist.PrefixStore(f"tinylab/attempt_{restart}", store),
                                    rank=info.rank, world_size=info.world_size)
        else:
            dist.init_process_group(backend=backend)
    if dist.get_backend() != "gloo":
        info.control_group = dist.new_group(backend="gloo")
    return info


def teardown_distributed(barrier: bool = False) -> None:
    """Destroys the process group. barrier=True (every rank at the normal end of a run) first
    waits for all ranks, so none tears its group down while a peer still works on its end (rank 0
    plotting, say). Once in CI (torch 2.14.1, gloo) rank 1 aborted with "terminate called without
    an active exception" after tearing down while rank 0 was still plotting; the barrier is cheap
    insurance against that, not a proven fix."""
    if dist.is_initialized():
        if barrier and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sums a dict of floats over ranks (identity in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1) or not values:
        return dict(values)
    keys = sorted(values)
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return dict(zip(keys, packed.tolist()))


def max_over_ranks(value: int, info: Dist) -> int:
    """The largest of every rank's integer `value` (itself in a single process), sent on the CPU."""
    return _reduce_int(value, info, dist.ReduceOp.MAX) if info.enabled else value


def min_over_ranks(value: int, info: Dist) -> int:
    return _reduce_int(value, info, dist.ReduceOp.MIN) if info.enabled else value


def _reduce_int(value: int, info: Dist, op) -> int:
    packed = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(packed, op=op, group=info.control_group)
    return int(packed.item())


def same_on_all_ranks(tensors) -> bool:
    """True when every tensor is bit-for-bit the same on every rank (elementwise max == min)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return True
    same = True
    for tensor in tensors:
        high, low = tensor.detach().clone(), tensor.detach().clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        same = same and torch.equal(high, low)
    return same


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 only (None elsewhere); [obj] in a single process.
    For large objects that only rank 0 writes (an SAE's live buffers)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s object on every rank (e.g. the generated run name)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ---------------------------------------------------------------- device and precision


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device: cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
        return torch.device("cuda", local_rank)
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device: mps was asked for but is not available; use --device cpu or auto")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: bf16 on GPUs that support it under 'auto', fp32 elsewhere."""
    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context for the forward pass; a no-op in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------- seeding and RNG state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict:
    """Every global RNG, in types that `torch.load(weights_only=True)` accepts."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"],
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"], "gauss": n["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- logging


def setup_logging(is_main: bool) -> logging.Logger:
    """A logger that prints on rank 0 and buffers until `attach_log_file` names train.log.

    Other ranks log nothing, so their stdout stays quiet under torchrun.
    """
    logger = logging.getLogger("tinylab")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.CRITICAL + 1)
    if is_main:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
        # Lines logged before the run directory exists reach train.log once it does.
        logger.addHandler(logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1))
    return logger


def attach_log_file(logger: logging.Logger, path: str) -> None:
    file_handler = logging.FileHandler(path, mode="a")
    file_handler.setFormatter(logging.Formatter("%(message)s"))
    for handler in list(logger.handlers):
        if isinstance(handler, logging.handlers.MemoryHandler):
            handler.setTarget(file_handler)
            handler.flush()
            logger.removeHandler(handler)
            handler.close()
    logger.addHandler(file_handler)


def close_logging(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def run_command(main) -> None:
    """`if __name__ == "__main__"` of a tool (sae.py, lens.py, activations.py): bad input (a
    ConfigError or CheckpointError) is one line on stderr, from rank 0 only, and exit status 2; a
    run stopped by a signal with its checkpoint saved (a summary whose "interrupted" names the
    signal) exits 128 + that signal, as schedulers expect of an unfinished job."""
    try:
        summary = main()
    except (ConfigError, CheckpointError) as error:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike; one says so
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if isinstance(summary, dict) and summary.get("interrupted"):
        sys.exit(128 + signal.Signals[summary["interrupted"]])


def wandb_sweep_run() -> tuple[str, str] | None:
    """(sweep id, run id) when `wandb agent` started this process (it sets both variables)."""
    sweep_id, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    return (sweep_id, run_id) if sweep_id and run_id else None


def load_env_files() -> None:
    """Settings that stay out of config.json and the logs (WANDB_API_KEY, WANDB_PROJECT, WANDB_MODE,
    RCLONE_DEST, ...) may live in a .env file, in the working directory or beside the code.
    Variables already set in the environment win."""
    from dotenv import find_dotenv, load_dotenv

    load_dotenv(find_dotenv(usecwd=True))
    load_dotenv(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".env"))


def describe_environment(device: torch.device, world_size: int) -> str:
    """Versions and hardware, so that a log describes the machine it came from."""
    lines = [
        f"python {platform.python_version()} · torch {torch.__version__} · numpy {np.__version__}",
        f"host {platform.node()} · {platform.platform()} · {os.cpu_count()} CPUs · "
        f"torch threads {torch.get_num_threads()}",
        f"device {device} · world size {world_size}",
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"gpu {props.name} · {props.total_memory / 2**30:.0f} GiB · "
                     f"CUDA {torch.version.cuda} · cuDNN {torch.backends.cudnn.version()}")
    return "\n".join(lines)


# ---------------------------------------------------------------- run directory and checkpoints


class CheckpointError(Exception):
    """A checkpoint that cannot be read or used; the message names the file."""


def generate_run_name(cfg: Config) -> str:
    what = {"modular": f"{cfg.operation}{cfg.modulus}", "dyck": f"dyck{cfg.dyck_types}",
            "text": f"text-{cfg.tokenizer}"}[cfg.task]
    return f"{what}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def create_run_dir(save_model_dir: str, run: str, resuming: bool) -> str:
    """Makes <save_model_dir>/<run>/. A fresh run never reuses another run's directory."""
    path = os.path.join(save_model_dir, run)
    if os.path.exists(save_model_dir) and not os.path.isdir(save_model_dir):
        raise ConfigError(f"--save_model_dir: {save_model_dir} is a file, not a directory")
    if os.path.exists(path) and not resuming and (not os.path.isdir(path) or os.listdir(path)):
        raise ConfigError(f"--run: {path} already holds a run; pick another --run name "
                          f"or pass --resume auto to continue it")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--save_model_dir: cannot create {path} ({e.strerror})") from None
    return path


def unique_run_name(save_model_dir: str, base: str) -> str:
    name, n = base, 1
    while os.path.exists(os.path.join(save_model_dir, name)):
        n += 1
        name = f"{base}-{n}"
    return name


def save_checkpoint(obj: dict, path: str) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`.

    A crash (or kill) mid-write leaves the previous checkpoint intact and loadable.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Loads with weights_only=True; any failure becomes a CheckpointError naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a torch file, or a pickle that needs code to load
        text = str(e)
        if "weights_only" in text or "npickl" in type(e).__name__:
            detail = "not a torch checkpoint, or one that only loads by running its own code"
        elif isinstance(e, EOFError) or not text:
            detail = "empty or cut short"
        else:  # e.g. "PytorchStreamReader failed reading zip archive: failed finding central directory"
            detail = text.splitlines()[0].split(". ")[0][:160]
        raise CheckpointError(f"{path} is not a readable checkpoint ({detail})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a tinylab checkpoint (no 'model' and 'config' entries)")
    return ckpt


def newest_checkpoint(run_dir: str) -> str | None:
    """The later of a run directory's last.pt and best.pt, or None when it holds neither.

    last.pt is written every save_every steps, best.pt at every eval that improves val_loss, so
    after a preemption either may be the later one; both hold the full training state.
    """
    candidates = [os.path.join(run_dir, n) for n in ("last.pt", "best.pt")]
    candidates = [c for c in candidates if os.path.isfile(c)]
    return max(candidates, key=os.path.getmtime) if candidates else None


def find_checkpoint(path: str) -> str:
    """A checkpoint file, or a run directory's newest checkpoint."""
    if os.path.isdir(path):
        newest = newest_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"{path} holds no last.pt or best.pt")
        return newest
    return path


def trim_metrics(path: str, last_step: int) -> None:
    """Drops metrics.jsonl records past `last_step`: a resumed run logs those steps again."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= last_step]
    if len(kept) != len(lines):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


# ---------------------------------------------------------------- preemption, restarts, syncing


class StopSignals:
    """SIGTERM and SIGUSR1 ask the loop to stop after the current step instead of killing it.

    Slurm sends one of them before preemption or at the time limit (`--signal`), torchrun forwards
    SIGTERM (and whatever TORCHELASTIC_SIGNALS_TO_HANDLE lists) to its workers, and `kill` sends
    SIGTERM. The handler only records the first signal, so a second one, even in the middle of
    saving a checkpoint, changes nothing. Use as a context manager: the previous handlers return on
    exit. Outside the main thread (where Python cannot install handlers) it records nothing.
    """

    NAMES = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received = 0  # signal number, 0 for none
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                if hasattr(signal, name):  # Windows has no SIGUSR1
                    number = getattr(signal, name)
                    self._previous[number] = signal.signal(number, self._record)
        return self

    def _record(self, signum, frame) -> None:
        self.received = self.received or signum

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)  # None: set from C
        self._previous.clear()


def elastic_restart_count() -> int:
    """How many times `torchrun --max-restarts` has restarted this worker (0 outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _launch_pointer(save_model_dir: str) -> str | None:
    """A file in save_model_dir naming the run this torchrun launch created (None outside torchrun).

    Restarted workers must find the run their first attempt named, and every node must compute
    the same file name. torchrun's run id is the same for every attempt and node of one launch;
    with the default static rendezvous it is "none", and the master's address and port stand in
    (plus the host name when the master is this machine's loopback address, so that single-node
    launches on hosts that share a file system keep apart).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    key = os.environ["TORCHELASTIC_RUN_ID"]
    if key in ("", "none"):
        address = os.environ.get("MASTER_ADDR", "")
        key = f"{address}-{os.environ.get('MASTER_PORT', '')}"
        if address.startswith("127.") or address in ("localhost", "::1"):
            key = f"{platform.node()}-{key}"
    key = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return os.path.join(save_model_dir, f".torchrun-{key}")


def _launcher_start_time() -> float | None:
    """When this worker's parent, the torchrun agent, started (seconds since the epoch; Linux)."""
    try:
        with open(f"/proc/{os.getppid()}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time since boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def remember_launch(save_model_dir: str, run: str) -> None:
    """Rank 0, first attempt: note which run this torchrun launch is training."""
    path = _launch_pointer(save_model_dir)
    if path is not None:
        with open(path, "w") as f:
            f.write(run)


def launched_run(save_model_dir: str) -> str | None:
    """The run this torchrun launch named on its first attempt, if it got that far.

    A pointer older than our torchrun agent was left by an earlier launch that crashed for good
    (the first attempt of a launch always rewrites it), so it is ignored. The minute of slack
    allows for clocks that differ between nodes and a network file system.
    """
    path = _launch_pointer(save_model_dir)
    if path is None or not os.path.isfile(path):
        return None
    started = _launcher_start_time()
    if started is not None and os.path.getmtime(path) < started - 60:
        return None
    with open(path) as f:
        return f.read().strip() or None


def forget_launch(save_model_dir: str) -> None:
    path = _launch_pointer(save_model_dir)
    if path is not None and os.path.isfile(path):
        os.remove(path)


class RcloneSync:
    """Copies the run directory to `$RCLONE_DEST/<run>` with rclone, in the background.

    `rclone copy`, not `rclone sync`: a requeued job on a node with an empty local disk must never
    delete what was already copied. Half-written checkpoints (`.last.pt.tmp-*`) are never copied,
    and `wandb/` (whose files change while W&B runs) only in the last copy. A copy that fails is
    logged and training goes on; a copy still running when the next is due is left to finish and
    the next one is skipped. rclone's output goes to a temporary file, never a pipe it could fill.
    """

    def __init__(self, run_dir: str, dest: str, log: logging.Logger):
        self.run_dir, self.log = run_dir, log
        self.target = f"{dest.rstrip('/')}/{os.path.basename(os.path.normpath(run_dir))}"
        self.process: subprocess.Popen | None = None
        self.output = None
        self.disabled = shutil.which("rclone") is None
        if self.disabled:
            log.warning(f"warning: RCLONE_DEST is set but rclone is not installed; the run directory "
                        f"will not be copied to {self.target}")

    def start(self, final: bool = False) -> None:
        if self.disabled or self._running():
            return
        excludes = ["--exclude", ".*.tmp-*"] + ([] if final else ["--exclude", "wandb/**"])
        self.output = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(["rclone", "copy", self.run_dir, self.target, *excludes],
                                        stdout=self.output, stderr=subprocess.STDOUT, text=True)

    def _running(self) -> bool:
        if self.process is None:
            return False
        if self.process.poll() is None:
            return True
        self._report()
        return False

    def _report(self) -> None:
        process, self.process = self.process, None
        self.output.seek(0)
        lines = [line for line in self.output.read().splitlines() if line.strip()]
        self.output.close()
        if process.returncode:
            last = lines[-1] if lines else "no output"
            self.log.warning(f"rclone copy to {self.target} failed (exit {process.returncode}): {last}")

    def finish(self, timeout: float = 600) -> bool:
        """Waits for a running copy, then copies once more; True when the last copy succeeded."""
        if self.process is not None:
            self._wait(timeout)
        self.start(final=True)
        if self.process is None:
            return False
        succeeded = self._wait(timeout)
        if succeeded:
            self.log.info(f"copied the run directory to {self.target}")
        return succeeded

    def _wait(self, timeout: float) -> bool:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            self.log.warning(f"rclone copy to {self.target} took over {timeout:.0f}s; stopped it")
        succeeded = self.process.returncode == 0
        self._report()
        return succeeded


# ---------------------------------------------------------------- FLOPs and MFU

# Peak dense bf16/fp16 tensor-core FLOP/s per GPU (no sparsity), from the vendors' data sheets.
# Matched by substring of torch.cuda.get_device_name(); the first match wins, so specific names
# come before general ones. A GPU not listed gets no MFU rather than a guess.
PEAK_FLOPS = [
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
]


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of this GPU; None on CPU, MPS and GPUs missing from the table."""
    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_flops_of(gpu_name: str) -> float | None:
    for key, flops in PEAK_FLOPS:
        if key in gpu_name:
            return flops
    return None


def flops_per_token(num_params: int, num_blocks: int, num_heads: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12·L·H·Q·T for attention (PaLM, app. B)."""
    return 6 * num_params + 12 * num_blocks * num_heads * head_dim * seq_len


# ---------------------------------------------------------------- metrics file and plots


def format_duration(seconds: float) -> str:
    """12.3s, 4m05s, 2h13m."""
    if seconds < 60:
        return f"{max(seconds, 0.0):.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class MetricsLog:
    """A tool's metrics.jsonl (rank 0 writes it), mirrored to W&B when `wandb_settings` (keyword
    arguments of wandb.init: project, name, dir, config) are given: the writer sae.py and lens.py
    share. `wandb_id` continues a checkpoint's W&B run; `.wandb_id` is the one to checkpoint, kept
    even if W&B fails later (under Slurm the stop signal reaches W&B's service process too). W&B
    trouble never stops training, and never strands the other ranks: it is a warning, and W&B is
    dropped."""

    def __init__(self, path: str, is_main: bool, log: logging.Logger, step: int = 0,
                 wandb_settings: dict | None = None, wandb_id: str | None = None):
        self.path, self.is_main, self.log = path, is_main, log
        self.run, self.wandb_id = None, wandb_id
        if is_main:
            trim_metrics(path, step)  # a resumed run logs the steps after its checkpoint (`step`) again
        if is_main and wandb_settings is not None:
            import wandb

            self.run = wandb.init(resume="allow", id=wandb_id, **wandb_settings)
            self.wandb_id = self.run.id

    def write(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            try:
                self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
            except Exception as e:
                self.log.warning(f"warning: W&B logging failed ({type(e).__name__}: {e}); going on without W&B")
                self.run = None

    def finish(self, interrupted: int = 0) -> None:
        """Closes the W&B run: preempted (not failed) until it resumes when a signal stopped it."""
        if self.run is None:
            return
        try:
            if interrupted:
                self.run.mark_preempting()
            self.run.finish(exit_code=128 + interrupted if interrupted else 0)
        except Exception as e:
            self.log.warning(f"warning: closing the W&B run failed ({type(e).__name__}: {e})")


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl (one JSON object per logged step or eval)."""
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


def plot_training_curves(metrics_path: str, out_path: str, title: str = "") -> str:
    """Train/val loss and accuracy against optimizer steps on a log axis: the grokking picture."""
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure state to disturb

    records = read_metrics(metrics_path)

    def series(key):
        points = [(r["step"], r[key]) for r in records if key in r and r["step"] > 0]
        return [p[0] for p in points], [p[1] for p in points]

    has_acc = any("val_acc" in r or "train_acc" in r for r in records)
    has_progress = any("restricted_loss" in r for r in records)  # --track_progress
    panels = 1 + has_acc + 2 * has_progress
    fig = Figure(figsize=(5.5 * panels, 4))
    axes = fig.subplots(1, panels, squeeze=False)
    loss_ax = axes[0, 0]
    for key in ("train_loss", "val_loss"):
        steps, values = series(key)
        if steps:
            loss_ax.plot(steps, values, label=key)
    loss_ax.set(xscale="log", yscale="log", xlabel="step", ylabel="loss", title="loss")
    if has_acc:
        acc_ax = axes[0, 1]
        for key in ("train_acc", "val_acc"):
            steps, values = series(key)
            if steps:
                acc_ax.plot(steps, values, label=key)
        acc_ax.set(xscale="log", xlabel="step", ylabel="accuracy", title="accuracy", ylim=(-0.02, 1.02))
    if has_progress:
        # Nanda et al.'s picture: the restricted loss falls before the validation loss does, while
        # the excluded loss rises; the embedding concentrates on a few frequencies (gini up) as
        # weight decay cleans up the memorising solution (weight norm down).
        measures_ax, shape_ax = axes[0, 1 + has_acc], axes[0, 2 + has_acc]
        for key in ("train_loss", "val_loss", "restricted_loss", "excluded_loss"):
            steps, values = series(key)
            if steps:
                measures_ax.plot(steps, values, label=key, linestyle="--" if key.startswith(("train", "val")) else "-")
        measures_ax.set(xscale="log", yscale="log", xlabel="step", ylabel="loss (training pairs)",
                        title="progress measures")
        steps, values = series("fourier_gini")
        shape_ax.plot(steps, values, color="tab:purple", label="fourier_gini")
        shape_ax.set(xscale="log", xlabel="step", ylabel="gini of embedding frequency norms",
                     title="sparsity and size", ylim=(0, 1))
        norm_ax = shape_ax.twinx()
        steps, values = series("weight_norm")
        norm_ax.plot(steps, values, color="tab:gray", label="weight_norm")
        norm_ax.set(ylabel="weight norm (L2, all parameters)")
        norm_ax.legend(loc="lower right")
    for ax in axes.flat:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    return out_path
