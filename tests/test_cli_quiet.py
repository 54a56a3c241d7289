"""Known harmless third-party messages are dropped at their source; the same libraries' other warnings, our
own and every error still show (issue 10, item 4). The end-to-end case runs the demo through the CLI."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from trainers import quiet_warnings

REPO = Path(__file__).resolve().parents[1]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def collected():
    quiet_warnings.install()
    handlers = {}
    for name, _ in quiet_warnings.LOGGER_FILTERS:
        handlers[name] = _Collect()
        logging.getLogger(name).addHandler(handlers[name])
    yield handlers
    for name, handler in handlers.items():
        logging.getLogger(name).removeHandler(handler)


FP32 = (
    "There are modules in AutoencoderKL that should be kept in float32: {}. Casting directly with `to()` ..."
)
REPORT = "CLIPTextModel LOAD REPORT from: /x\nKey | Status\n{} | {}\n"


@pytest.mark.parametrize(
    "logger, message, shown",
    [
        ("diffusers.models.modeling_utils", FP32.format("[]"), False),
        ("diffusers.models.modeling_utils", FP32.format("['conv_in']"), True),  # then it matters
        ("diffusers.models.modeling_utils", "Some weights of the model checkpoint were not used", True),
        ("transformers.modeling_utils", REPORT.format("text_model.position_ids", "UNEXPECTED"), False),
        ("transformers.modeling_utils", REPORT.format("text_model.final_layer_norm.weight", "MISSING"), True),
        ("transformers.modeling_utils", REPORT.format("text_projection.weight", "MISMATCH"), True),
        (
            "transformers.utils.import_utils",
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`",
            False,
        ),
        ("transformers.utils.import_utils", "Disabling PyTorch because PyTorch >= 2.4 is required", True),
        (
            "torchao",
            "Failed to load /v/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load",
            sys.version_info[:2] == (3, 10),  # a kernel built for another Python never loads here
        ),
        ("torchao", "Skipping import of cpp extensions due to incompatible torch version", True),
        (
            "diffusers.quantizers.torchao.torchao_quantizer",
            "Unable to import `torchao` Tensor objects. This may affect loading checkpoints serialized",
            False,
        ),
        (
            "torch.utils._pytree",
            "<enum 'X'> is an Enum subclass and is now natively supported by torch",
            False,
        ),
    ],
)
def test_only_the_known_message_is_dropped(collected, logger, message, shown) -> None:
    logging.getLogger(logger).warning(message)
    assert (message in collected[logger].messages) is shown


def test_errors_are_never_dropped(collected) -> None:
    logging.getLogger("diffusers.models.modeling_utils").error(FP32.format("[]"))
    assert collected["diffusers.models.modeling_utils"].messages == [FP32.format("[]")]


def test_the_torchvision_beta_warning_is_ignored_and_others_are_not() -> None:
    quiet_warnings.install()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_warnings.install_warning_filters()
        warnings.warn(
            "The torchvision.datapoints and torchvision.transforms.v2 namespaces are still Beta.",
            UserWarning,
            stacklevel=1,
        )
        warnings.warn("lora.rank is large", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["lora.rank is large"]


def test_the_cli_demo_ends_clean_and_says_what_next(tmp_path) -> None:
    """What a newcomer runs first: the console holds our lines, not the libraries' noise."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PPSF_DEMO_DIR=str(tmp_path / "demo"))
    env["PPSF_LAYER_CACHE"] = env["PPSF_MEMORY_CACHE"] = str(tmp_path / "cache")
    command = [sys.executable, "-m", "trainers", "train", "presets/demo.toml", "--set", "name=x"]
    command += ["--set", "training.max_steps=2", "--set", f"output_dir={tmp_path / 'runs'}"]
    command += ["--set", "sampling.every_n_steps=0", "--set", "sampling.steps=2"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    for noise in (
        "should be kept in float32: []",
        "requires torchvision (not installed)",
        "Unable to import `torchao`",
        "Failed to load",
        "is an Enum subclass",
        "LOAD REPORT",
    ):
        assert noise not in done.stderr
    lines = done.stdout.splitlines()
    assert lines[-7] == f"finished: {tmp_path / 'runs' / 'x'} (step 2)"
    assert "x-step000002.safetensors  (kohya format)" in done.stdout
    assert "load_lora_weights" in done.stdout and lines[-1].startswith("open it in the UI: python launch.py")
