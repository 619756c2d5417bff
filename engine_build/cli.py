"""``fod build``: compile a model package to a TensorRT engine on this GPU, check it, record it.

    fod build --model PKG_DIR --precision fp16|int8|fp32 [--out ENGINE] [--workspace-mib N]
              [--timing-cache PATH] [--max-batch N] [--opt-level N] [--parity-images DIR] [--force]

Steps (:func:`build_engine`): validate the package and the settings, check TensorRT / pycuda / GPU,
parse the ONNX variant of the chosen precision into a strongly typed network, build with progress
output, run the parity check against ONNX Runtime on sample frames, then write the engine and its
manifest (``<engine>.json``) atomically. A failed parity check leaves no engine behind unless
``--force`` is given; an existing engine is replaced only by one that passed.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import logging
from pathlib import Path

import numpy as np

from engine_build.errors import EngineBuildError, ParityError, TensorRTUnavailableError
from engine_build.manifest import (
    EngineManifest,
    current_runtime,
    default_engine_path,
    manifest_path,
    write_engine_manifest,
)
from engine_build.parity import compare_runners, load_frames, synthetic_frames
from engine_build.runner import TensorRTRunner, tensorrt_available
from engine_build.steps import (
    PRECISIONS,
    BuildProgress,
    BuildSettings,
    CreateConfig,
    EngineBytesFromNetwork,
    NetworkFromOnnx,
    SaveEngine,
)
from fod.package import ModelPackage
from fod.runner import OnnxRuntimeRunner

log = logging.getLogger("engine_build.build")

PARITY_FRAMES = 8


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fod build`` and its options."""
    p = subparsers.add_parser(
        "build",
        help="compile a model package to a TensorRT engine on this GPU (run once per box)",
        description=(
            "Build a TensorRT engine from the package's ONNX variant of the chosen precision, check it "
            "against ONNX Runtime, and write PKG_DIR/model.<precision>.engine with its .engine.json "
            "manifest. "
            "Needs TensorRT, pycuda and an NVIDIA GPU: see docs/engine.md."
        ),
    )
    p.add_argument("--model", required=True, type=Path, metavar="PKG_DIR", help="model package folder")
    p.add_argument(
        "--precision",
        required=True,
        choices=PRECISIONS,
        help="ONNX variant to build from: model.onnx (fp32), model.fp16.onnx, model.int8.onnx",
    )
    p.add_argument(
        "--out", type=Path, metavar="ENGINE", help="engine file (default PKG_DIR/model.<precision>.engine)"
    )
    p.add_argument(
        "--max-batch", type=int, default=4, metavar="N", help="largest batch the engine accepts (4)"
    )
    p.add_argument(
        "--workspace-mib", type=int, metavar="N", help="TensorRT workspace limit in MiB (default: TensorRT's)"
    )
    p.add_argument(
        "--timing-cache",
        type=Path,
        metavar="PATH",
        help="timing cache file, read and updated (faster rebuilds)",
    )
    p.add_argument(
        "--opt-level", type=int, metavar="N", help="builder optimisation level 0..5 (TensorRT default 3)"
    )
    p.add_argument(
        "--parity-images",
        type=Path,
        metavar="DIR",
        help=f"images for the parity check (default: {PARITY_FRAMES} synthetic frames)",
    )
    p.add_argument("--device", type=int, default=0, metavar="N", help="CUDA device index (0)")
    p.add_argument(
        "--force",
        action="store_true",
        help="keep the engine although the parity check failed (or could not run without onnxruntime)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``fod build``; returns the exit code (errors raise :class:`EngineBuildError`, exit 2)."""
    manifest = build_engine(
        args.model,
        args.precision,
        out=args.out,
        max_batch=args.max_batch,
        workspace_mib=args.workspace_mib,
        timing_cache=args.timing_cache,
        opt_level=args.opt_level,
        parity_images=args.parity_images,
        device=args.device,
        force=args.force,
    )
    engine = Path(manifest.package_dir) / manifest.engine_file if args.out is None else Path(args.out)
    parity = manifest.parity.get("summary", "skipped")
    print(f"engine:   {engine} ({manifest.precision}, built in {manifest.build_time_s:.0f} s)")
    print(f"manifest: {manifest_path(engine)}")
    print(
        f"device:   {manifest.gpu_name} (compute {manifest.compute_capability}), "
        f"TensorRT {manifest.tensorrt_version}"
    )
    print(f"parity:   {parity}")
    return 0


def build_engine(
    package_dir: str | Path,
    precision: str,
    *,
    out: str | Path | None = None,
    max_batch: int = 4,
    workspace_mib: int | None = None,
    timing_cache: str | Path | None = None,
    opt_level: int | None = None,
    parity_images: str | Path | None = None,
    device: int = 0,
    force: bool = False,
    heartbeat_s: float = 10.0,
) -> EngineManifest:
    """Build, check and record the engine of a model package (what ``fod build`` does).

    Args:
        package_dir: the model package folder.
        precision: ``fp32``, ``fp16`` or ``int8`` (selects ``model.onnx`` / ``model.fp16.onnx`` /
            ``model.int8.onnx``).
        out: engine file; None: ``PKG_DIR/model.<precision>.engine``.
        max_batch: largest batch the engine accepts.
        workspace_mib: TensorRT workspace limit in MiB (None: TensorRT's default).
        timing_cache: timing cache file, read before and written after the build.
        opt_level: builder optimisation level 0..5 (None: TensorRT's default, 3).
        parity_images: folder of images for the parity check; None: synthetic frames.
        device: CUDA device index.
        force: keep the engine even if the parity check fails or cannot run.
        heartbeat_s: seconds between progress lines during the build.

    Returns:
        the written :class:`~engine_build.manifest.EngineManifest`.

    Raises:
        PackageError: the package is invalid or lacks the variant (the message says how to make it).
        EngineBuildError: bad settings, unparsable ONNX, failed build.
        TensorRTUnavailableError: TensorRT, pycuda or the GPU is missing (with install instructions).
        ParityError: the engine disagrees with ONNX Runtime (nothing written; ``force`` keeps it).
    """
    package = ModelPackage(package_dir)
    onnx_path = package.onnx_path(precision)
    settings = BuildSettings(
        precision=precision,
        max_batch=max_batch,
        workspace_mib=workspace_mib,
        opt_level=opt_level,
        timing_cache=Path(timing_cache) if timing_cache is not None else None,
    )
    engine_path = Path(out) if out is not None else default_engine_path(package.root, precision)
    frames = (
        load_frames(parity_images, package.image_size)
        if parity_images is not None
        else synthetic_frames(package.image_size, PARITY_FRAMES)
    )
    ok, reason = tensorrt_available(device)
    if not ok:
        raise TensorRTUnavailableError(f"`fod build` cannot run on this machine: {reason}")
    has_reference = importlib.util.find_spec("onnxruntime") is not None
    if not has_reference and not force:  # say so before a build of minutes, not after
        raise EngineBuildError(
            "the parity check needs ONNX Runtime as its reference: `pip install onnxruntime` (the CPU "
            "build is enough), or pass --force to keep the engine unchecked"
        )
    runtime = current_runtime(device)
    log.info(
        "building a %s engine of %r from %s on %s (compute %s) with TensorRT %s: batch 1..%d, workspace %s, "
        "optimisation level %s, timing cache %s",
        precision,
        package.manifest.model_name,
        onnx_path,
        runtime.gpu_name,
        runtime.compute_capability,
        runtime.tensorrt_version,
        settings.max_batch,
        f"{workspace_mib} MiB" if workspace_mib else "default",
        opt_level if opt_level is not None else "default",
        settings.timing_cache or "none",
    )

    progress = BuildProgress()
    plan = EngineBytesFromNetwork(
        NetworkFromOnnx(onnx_path),
        CreateConfig(settings, package.image_size, progress=progress),
        progress=progress,
        heartbeat_s=heartbeat_s,
        timing_cache=settings.timing_cache,
    )()
    build_time_s = progress.elapsed_s

    staged = engine_path.with_name(engine_path.name + ".new")
    try:
        SaveEngine(plan, staged)()
        if has_reference:
            parity = _parity(staged, onnx_path, package.image_size, frames, settings, device, force)
        else:
            log.warning("parity check skipped (--force): onnxruntime is not installed")
            parity = {"skipped": "onnxruntime not installed", "passed": None, "forced": True}
        manifest = EngineManifest(
            engine_file=engine_path.name,
            engine_sha256=hashlib.sha256(plan).hexdigest(),
            precision=precision,
            tensorrt_version=runtime.tensorrt_version,
            gpu_name=runtime.gpu_name,
            compute_capability=runtime.compute_capability,
            model_name=package.manifest.model_name,
            package_dir=str(package.root.resolve()),
            source_onnx=onnx_path.name,
            source_onnx_sha256=package.manifest.files[onnx_path.name],
            image_size=package.image_size,
            build_settings=settings.to_dict(),
            build_time_s=round(build_time_s, 3),
            built_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            fod_agent_version=_version(),
            parity=parity,
        )
        staged.replace(engine_path)
        write_engine_manifest(engine_path, manifest)
    finally:
        staged.unlink(missing_ok=True)
    log.info("engine %s and %s written", engine_path, manifest_path(engine_path).name)
    return manifest


def _parity(
    engine: Path,
    onnx_path: Path,
    image_size: tuple[int, int],
    frames: np.ndarray,
    settings: BuildSettings,
    device: int,
    force: bool,
) -> dict[str, object]:
    """Run the parity check of a staged engine; returns the report dict or raises :class:`ParityError`."""
    report = compare_runners(
        OnnxRuntimeRunner(onnx_path, image_size),
        TensorRTRunner(engine, image_size, device=device, verify=False),
        frames,
        precision=settings.precision,
        batch_size=settings.max_batch,
    )
    result: dict[str, object] = {**report.to_dict(), "summary": report.summary(), "forced": False}
    if not report.passed:
        if not force:
            raise ParityError(
                f"{report.summary()}; {'; '.join(report.failures)}. The engine was not written. Check the "
                "package with `fod eval`, rebuild with another --precision, or pass --force to keep it "
                "anyway",
                result,
            )
        log.warning("%s; keeping the engine because of --force", report.summary())
        result["forced"] = True
    return result


def _version() -> str:
    from fod import __version__

    return __version__
