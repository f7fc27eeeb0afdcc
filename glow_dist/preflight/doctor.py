"""`glow-dist doctor`: what a node can run, checked for real, one PASS/FAIL/SKIP line per check.

Checks: torch and its CUDA build, the GPUs and their memory, cuDNN/TF32 state, which memory, step and decode modes
the config runs on this rank's device (on CUDA captured for real, on a tiny model of the config's kind), Horovod's
build (frameworks, controllers, GPU operations) and, under horovodrun, an all-reduce across every rank on the rank's
device, DALI with
a real decode of a tiny in-memory JPEG batch ("mixed", i.e. on the GPU, when there is one; CPU otherwise) against
PIL's decode, webdataset, the MLflow tracking URI the config would use (with the credentials training would send: a
refusal fails here, before a job starts), and with `--data` the manifest and one sample of every split. FAIL means
something this config needs is missing or broken; SKIP means not needed here.
"""
from __future__ import annotations

import dataclasses
import io
import os
import socket
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glow_dist.config import Config, ModelConfig, tracking_store
from glow_dist.distributed.gateway import horovod_build, launched_by_horovod
from glow_dist.mlflow_auth import refusal

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
JPEG_MEAN_ABS_BOUND = 2.0  # mean |DALI - PIL| per pixel for the probe JPEGs (IDCT rounding differs, by design)


@dataclass
class Check:
    name: str
    status: str
    detail: str

    def line(self, prefix: str = "") -> str:
        return f"{prefix}{self.status}  {self.name:<11} {self.detail}"


def check_torch() -> Check:
    import torch

    cuda = torch.version.cuda or "none (CPU build)"
    return Check("torch", PASS, f"{torch.__version__}, CUDA build {cuda}, CUDA available: "
                                f"{torch.cuda.is_available()}")


def cuda_driver() -> str | None:
    """The NVIDIA driver's CUDA library if this machine has one (a CUDA torch needs it to see any GPU)."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            continue
    return None


def no_gpu_reason(torch_cuda: str | None, driver: str | None, visible: str | None) -> str:
    """Why torch sees no GPU, and what this run does instead, in words."""
    if not torch_cuda:
        why = "this torch is a CPU-only build"
    elif driver is None:
        why = f"this torch is a CUDA {torch_cuda} build but there is no NVIDIA driver (no libcuda.so.1)"
    elif visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        why = f"the driver is there but CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    else:
        why = f"this torch is a CUDA {torch_cuda} build and the driver loads, but it reports no usable GPU"
    return (f"no CUDA device: {why}. So: training runs on the CPU, data.decode=auto decodes on the CPU, Horovod "
            "all-reduces over Gloo; NCCL, DALI's GPU decode and the CUDA step modes are not exercised here")


def check_gpus(need_gpu: bool) -> Check:
    import torch

    if not torch.cuda.is_available():
        detail = no_gpu_reason(torch.version.cuda, cuda_driver(), os.environ.get("CUDA_VISIBLE_DEVICES"))
        if need_gpu:
            return Check("gpus", FAIL, detail + "; the config asks for GPU decoding (data.decode=gpu)")
        return Check("gpus", SKIP, detail)
    parts = []
    mine = int(os.environ.get("HOROVOD_LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")))
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        text = f"cuda:{i} {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.1f} GiB"
        if i == mine:  # free memory needs a CUDA context: only on this rank's own GPU, not on its neighbours'
            text += f" ({torch.cuda.mem_get_info(i)[0] / 2**30:.1f} free)"
        parts.append(text)
    return Check("gpus", PASS, f"{len(parts)}: " + "; ".join(parts))


def check_cudnn() -> Check:
    import torch

    if not torch.cuda.is_available():
        return Check("cudnn/tf32", SKIP, "no CUDA device")
    b = torch.backends
    version = b.cudnn.version() if b.cudnn.is_available() else None
    return Check("cudnn/tf32", PASS if version else FAIL,
                 f"cuDNN {version or 'missing'} enabled={b.cudnn.enabled} benchmark={b.cudnn.benchmark}; "
                 f"TF32 matmul={b.cuda.matmul.allow_tf32} conv={b.cudnn.allow_tf32}; "
                 f"float32 matmul precision {torch.get_float32_matmul_precision()}")


def probe_model_config(cfg: ModelConfig) -> ModelConfig:
    """The config's kind of model (coupling, 1x1 convs, bits, classes) at a size that captures in seconds."""
    return dataclasses.replace(cfg, image_size=8, levels=2, steps=2, width=16)


def check_modes(cfg: Config) -> Check:
    """The memory, step and decode modes this config runs on this rank's device. On CUDA the step and the decoder
    are captured for real, through the trainer's capture-and-check (glow_dist.runtime.capture_graph), on a tiny model
    of the config's kind with its runtime settings (torch.compile off: it would take minutes); a graphed mode that
    falls back here would fall back in training too (slower, still correct): FAIL, with the reason."""
    import torch

    from glow_dist.inference.decoding import Decoder
    from glow_dist.model import build_model, resolved_runtime
    from glow_dist.runtime import capture_graph, device_memory_bytes, resolve_mode, step_capture_blockers

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    ranks_here = int(os.environ.get("HOROVOD_LOCAL_SIZE", os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1")))
    runtime, why_memory = resolved_runtime(cfg.runtime, cfg.model, cfg.train.batch_size,
                                           device_memory_bytes(device, ranks_here))
    step, why_step = resolve_mode(cfg.runtime.step_mode, device, step_capture_blockers(cfg))
    decode, why_decode = resolve_mode(cfg.runtime.sample_mode, device)
    memory = f"memory {runtime.memory}" + (f" ({why_memory})" if why_memory else "")
    failed = []
    if cuda and "graphed" in (step, decode):
        tiny = probe_model_config(cfg.model)
        torch.manual_seed(0)
        model = build_model(tiny, dataclasses.replace(runtime, compile=False)).to(device)
        x = torch.rand(4, tiny.channels, tiny.image_size, tiny.image_size, device=device) - 0.5
        y = torch.arange(4, device=device) % tiny.num_classes if tiny.y_condition else None
        model.initialize(x, y)
        params = list(model.parameters())

        def clear() -> None:
            for p in params:
                p.grad = None

        def forward_backward() -> list[torch.Tensor]:
            clear()
            loss = -model.log_prob(x, y).mean()
            loss.backward()
            return [loss, *[p.grad for p in params]]

        if step == "graphed":
            captured = capture_graph(forward_backward, warmup_passes=2, log=lambda _: None, what="[doctor]",
                                     before_capture=clear)
            if isinstance(captured, str):
                step, why_step = "eager", captured
                failed.append("step")
            clear()
            del captured
        if decode == "graphed":
            decoder = Decoder(model.eval().requires_grad_(False), cfg.runtime.sample_mode, log=lambda _: None)
            decoder.sample(2, 0.7, seed=0)
            if decoder.mode != "graphed":
                decode, why_decode = decoder.mode, decoder.reason
                failed.append("decode")
    step_text = f"step {step}" + (f" ({why_step})" if why_step else "")
    decode_text = f"decode {decode}" + (f" ({why_decode})" if why_decode else "")
    captured_note = " (captured and checked against eager on a tiny model)" if cuda and not failed and \
        "graphed" in (step, decode) else ""
    status = FAIL if failed else PASS
    return Check("modes", status, f"{memory}; {step_text}; {decode_text}{captured_note}" +
                 (f"; training would run {' and '.join(failed)} eagerly" if failed else ""))


def check_horovod() -> Check:
    import torch

    try:
        version, built = horovod_build()
    except ImportError as e:
        status = FAIL if launched_by_horovod() else SKIP
        return Check("horovod", status, f"not importable ({e}); single-process only; `make horovod` builds it")
    have = ", ".join(f"{k}{'+' if v else '-'}" for k, v in built.items())
    detail = f"{version}: PyTorch; controllers and ops: {have}"
    if torch.cuda.is_available() and not built["NCCL"]:
        return Check("horovod", FAIL, detail + "; this node has GPUs but Horovod has no NCCL: rebuild with "
                                               "launch/install-horovod.sh against the CUDA torch")
    if not built["Gloo"] and not built["MPI"]:
        return Check("horovod", FAIL, detail + "; no controller (Gloo or MPI)")
    return Check("horovod", PASS, detail)


def check_allreduce() -> Check:
    """Under a launcher: every rank adds rank+1 on its own device; the sum must be n(n+1)/2 everywhere."""
    import torch

    from glow_dist.distributed import gateway as dist

    if not launched_by_horovod():
        return Check("allreduce", SKIP, "not under horovodrun (run `horovodrun -np N glow-dist doctor`)")
    dist.init()
    device = dist.pin_device()
    n, r = dist.size(), dist.rank()
    got = dist.allreduce_sum(torch.full((1024,), float(r + 1), device=device), name="doctor.allreduce")
    want = n * (n + 1) / 2
    ok = bool(torch.all(got == want).item())
    via = "NCCL" if device.type == "cuda" else "Gloo"
    return Check("allreduce", PASS if ok else FAIL,
                 f"rank {r}/{n} on {device} ({via}): sum {got[0].item():g}, expected {want:g}")


def _probe_jpegs(count: int = 4, size: int = 32) -> list[bytes]:
    """Smooth colour images (gradients and a disc): JPEG-friendly, so the decoders' differences stay small."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    blobs = []
    for k in range(count):
        disc = ((x - 0.5) ** 2 + (y - 0.3 - 0.1 * k) ** 2 < 0.08).astype(np.float32)
        rgb = np.stack([x, y, 0.5 * disc + 0.25 * k / count], axis=-1) * 255
        buf = io.BytesIO()
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
        blobs.append(buf.getvalue())
    return blobs


def dali_decode(blobs: list[bytes], device: str, device_id: int | None) -> np.ndarray:
    """Decode JPEG/PNG bytes with DALI (device "mixed" or "cpu"): uint8 (N, H, W, 3) on the host."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(blobs), num_threads=1, device_id=device_id)
    def pipeline() -> object:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        return fn.decoders.image(encoded, device=device, output_type=types.RGB)

    pipe = pipeline()
    pipe.build()
    pipe.feed_input("encoded", [np.frombuffer(b, dtype=np.uint8) for b in blobs])
    (out,) = pipe.run()
    if device == "mixed":
        out = out.as_cpu()
    return np.stack([np.array(out[i]) for i in range(len(blobs))])


def pil_decode(blobs: list[bytes]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])


def check_dali(cfg: Config) -> Check:
    import torch

    needed = cfg.data.backend == "dali" or cfg.data.decode == "gpu"
    try:
        import nvidia.dali as dali
    except ImportError:
        return Check("dali", FAIL if needed else SKIP,
                     f"not installed ({'data.backend=dali' if needed else 'the webdataset backend is used'})")
    gpu = torch.cuda.is_available() and cfg.data.decode != "cpu"
    device, device_id = ("mixed", torch.cuda.current_device()) if gpu else ("cpu", None)
    blobs = _probe_jpegs()
    try:
        got = dali_decode(blobs, device, device_id)
    except Exception as e:  # any DALI failure is the finding
        return Check("dali", FAIL, f"{dali.__version__}: {device} decode failed: {str(e).splitlines()[0]}")
    want = pil_decode(blobs)
    if got.shape != want.shape:
        return Check("dali", FAIL, f"{dali.__version__}: {device} decode gave {got.shape}, PIL {want.shape}")
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    ok = diff.mean() <= JPEG_MEAN_ABS_BOUND
    where = f"on cuda:{device_id}" if gpu else "on the CPU"
    return Check("dali", PASS if ok else FAIL,
                 f"{dali.__version__}: decoded {len(blobs)} JPEGs {where} ({device}); vs PIL mean |diff| "
                 f"{diff.mean():.3f}, max {diff.max()} (bound {JPEG_MEAN_ABS_BOUND})")


def check_webdataset() -> Check:
    try:
        import webdataset
    except ImportError as e:
        return Check("webdataset", FAIL, f"not importable: {e}")
    return Check("webdataset", PASS, getattr(webdataset, "__version__", "installed"))


def tracking_uri(cfg: Config) -> str:
    """The URI the trainer's tracker would use (tracking.uri, else $MLFLOW_TRACKING_URI, else the local store)."""
    return tracking_store(cfg.tracking)[0]


def check_mlflow(cfg: Config, timeout: float) -> Check:
    uri = tracking_uri(cfg)
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        creds = get_default_host_creds(uri)   # what the trainer's client sends: MLflow's variables or credentials file
        start = time.monotonic()
        try:
            # /health answers without touching the backend store or asking who we are; listing experiments proves
            # the REST API and the credentials.
            for endpoint, params in (("/health", None), ("/api/2.0/mlflow/experiments/search", {"max_results": 1})):
                r = http_request(creds, endpoint, "GET", max_retries=0, timeout=timeout, params=params)
                if r.status_code in (401, 403):
                    return Check("mlflow", FAIL, refusal(uri, r.status_code, "list experiments"))
                r.raise_for_status()
        except Exception as e:   # MLflow wraps the connection error of requests
            reason = type(e).__name__ if not str(e) else str(e).split(": ")[-1].rstrip("'\")")[:160]
            return Check("mlflow", FAIL, f"{uri} unreachable after {time.monotonic() - start:.1f} s: {reason}")
        who = f" as user {creds.username!r}" if creds.username else ""
        clear = (parsed.scheme == "http" and creds.password is not None
                 and parsed.hostname not in ("127.0.0.1", "localhost", "::1"))
        warning = "; the password goes over plain http: serve it through TLS (docs/security.md)" if clear else ""
        return Check("mlflow", PASS, f"{uri} answers{who} ({(time.monotonic() - start) * 1000:.0f} ms){warning}")
    if parsed.scheme in ("sqlite", "file", ""):
        path = Path(parsed.path if parsed.scheme else uri)
        folder = path.parent if parsed.scheme == "sqlite" else path
        probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("/"))
        if not os.access(probe, os.W_OK):
            return Check("mlflow", FAIL, f"{uri}: {probe} is not writable")
        return Check("mlflow", PASS, f"{uri} (local store, writable)")
    return Check("mlflow", SKIP, f"{uri}: scheme {parsed.scheme!r} not probed")


def check_data(cfg: Config, root: str, check_shape: bool) -> list[Check]:
    from glow_dist.data.base import decode_sample, read_range
    from glow_dist.data.manifest import SPLITS, DataError, check_model_shape, read_manifest, split_shards
    from glow_dist.data.shard_cache import local_root

    try:
        root = local_root(dataclasses.replace(cfg.data, root=root))   # a URL: this node's cache, filled now
        manifest = read_manifest(root)
        if check_shape:
            check_model_shape(manifest, cfg.model.image_size, cfg.model.channels, root)
    except DataError as e:
        return [Check("data", FAIL, str(e))]
    size, ch, ext = manifest["image_size"], manifest["channels"], manifest["image_ext"]
    checks = [Check("data", PASS, f"{root}: manifest {size}x{size}x{ch} .{ext}")]
    for split in SPLITS:
        if not manifest["splits"].get(split, {}).get("shards"):
            checks.append(Check(f"data:{split}", SKIP, "no shards"))
            continue
        try:
            shards = split_shards(manifest, root, split)
            sample = next(read_range(shards[:1], 0, 1, [ext, "cls"]), None)
            if sample is None:
                raise DataError(f"{shards[0]['path']} holds no sample")
            image, label = decode_sample(sample, ext, size, ch)
        except DataError as e:
            checks.append(Check(f"data:{split}", FAIL, str(e)))
            continue
        total = sum(s["num_samples"] for s in shards)
        checks.append(Check(f"data:{split}", PASS, f"{len(shards)} shard(s), {total} samples; read "
                                                   f"{sample['__key__']} ({image.shape}, label {label})"))
        checks.append(verify_check(cfg, root, manifest, split))
    return checks


def verify_check(cfg: Config, root: str, manifest: dict, split: str) -> Check:
    """What training's start-up verification (data.verify) would say of this node's copy of the split."""
    from glow_dist.data.verify import verify_split

    mode = cfg.data.verify if cfg.data.verify != "never" else "auto"  # the doctor is asked to look: it always does
    found = verify_split(root, manifest, split, mode, scan=True)
    name = f"verify:{split}"
    if found.problems:
        more = f" (and {len(found.problems) - 1} more)" if len(found.problems) > 1 else ""
        return Check(name, FAIL, found.problems[0] + more)
    how = f"{found.hashed_bytes / 1e6:.1f} MB hashed in {found.seconds:.2f} s, {found.cached_shards} shard(s) cached"
    if not found.bad:
        return Check(name, PASS, f"sha256 and sample headers match the manifest ({how})")
    names = ", ".join(b.describe() for b in found.bad[:5]) + (" ..." if len(found.bad) > 5 else "")
    limit = cfg.data.max_bad_samples
    status = FAIL if len(found.bad) > limit else PASS
    return Check(name, status, f"{len(found.bad)} bad sample(s) (data.max_bad_samples={limit}), training replaces "
                               f"them with substitutes: {names}")


def run_checks(cfg: Config, data: str | None, check_shape: bool, timeout: float,
               report: Callable[[Check], None]) -> list[Check]:
    """Every check in order, each reported as soon as it is done (a hang then shows where)."""
    checks: list[Check] = []

    def add(*found: Check) -> None:
        for c in found:
            checks.append(c)
            report(c)

    add(check_torch(), check_gpus(cfg.data.decode == "gpu"), check_cudnn(), check_modes(cfg), check_horovod())
    add(check_allreduce())
    add(check_dali(cfg), check_webdataset(), check_mlflow(cfg, timeout))
    if data is not None:
        add(*check_data(cfg, data, check_shape))
    return checks


def rank_prefix() -> str:
    if not launched_by_horovod():
        return ""
    rank = os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
    size = os.environ.get("HOROVOD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "?"))
    return f"[rank {rank}/{size} {socket.gethostname()}] "
