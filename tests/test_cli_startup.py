"""`check`, `--help` and config errors answer without importing torch, diffusers, transformers or peft
(issues 9 and 10): what the check path reads instead is held to the libraries here. Times are in
bench/startup.py, not in a test."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from trainers import checks
from trainers.__main__ import main as cli
from trainers.models.families import family_for
from trainers.tiny_models import CLIP_CONFIG, UNET_CONFIG

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("diffusers", "transformers", "peft")


def _tiny_layers(component: str) -> dict[str, tuple[int, int]]:
    config = UNET_CONFIG if component == "unet" else CLIP_CONFIG
    return checks._build_layers("sdxl", component, json.dumps(config, sort_keys=True))


@pytest.mark.parametrize("component", ["unet", "text_encoder_2"])
@pytest.mark.parametrize(
    "names",
    [
        ["to_k", "to_q", "to_v", "to_out.0"],
        ["attn1.to_q"],
        ["q_proj", "out_proj"],
        ["proj_in", "ff.net.2"],
        ["k"],  # a part of a name is not a match
        ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"],  # the full name
        ["text_model.encoder.layers.0.self_attn.k_proj"],
        ["nothing"],
    ],
)
def test_target_matching_is_peft_s_own_rule(component, names) -> None:
    layers = _tiny_layers(component)
    expected = [key for key in layers if check_target_module_exists(LoraConfig(target_modules=names), key)]
    assert checks._matching_layers(names, layers) == expected


def test_a_layer_table_is_built_once_and_then_read(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PPSF_LAYER_CACHE", str(tmp_path))
    checks._layers_of.cache_clear()
    config_json = json.dumps(UNET_CONFIG, sort_keys=True)
    built = checks._layers_of("sdxl", "unet", config_json)
    assert built == _tiny_layers("unet") and len(list(tmp_path.glob("*.json"))) == 1

    checks._layers_of.cache_clear()
    monkeypatch.setattr(checks, "_build_layers", lambda *a: pytest.fail("rebuilt although cached"))
    assert checks._layers_of("sdxl", "unet", config_json) == built

    checks._layers_of.cache_clear()
    next(tmp_path.glob("*.json")).write_text("{not json")  # a damaged table is built again
    monkeypatch.setattr(checks, "_build_layers", lambda *a: {"rebuilt": (1, 1)})
    assert checks._layers_of("sdxl", "unet", config_json) == {"rebuilt": (1, 1)}
    checks._layers_of.cache_clear()


def test_the_adapters_use_the_families_checks() -> None:
    """One definition: the adapter's pre-load answers are the light family class's."""
    from trainers.models import adapter_for

    for family in ("sdxl", "flux", "flux2"):
        light, adapter = family_for(family), adapter_for(family)
        assert issubclass(adapter, light)
        for name in ("check_model_file", "lora_target_lists", "component_config", "meta_component"):
            assert getattr(adapter, name).__func__ is getattr(light, name).__func__


def _imports_after(argv: list[str], env: dict[str, str]) -> tuple[int, list[str], str]:
    code = (
        "import sys\nfrom trainers.__main__ import main\n"
        "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as stop:\n    rc = stop.code\n"
        f"print('IMPORTED', [m for m in {HEAVY + ('torch',)!r} if m in sys.modules], rc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    last = [line for line in done.stdout.splitlines() if line.startswith("IMPORTED")][-1]
    names, rc = last.removeprefix("IMPORTED ").rsplit(" ", 1)
    return int(rc), eval(names), done.stdout + done.stderr  # noqa: S307 (our own print of a list)


@pytest.fixture
def quiet_env(tmp_path, monkeypatch) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for name, folder in (
        ("PPSF_DEMO_DIR", "demo"),
        ("PPSF_MEMORY_CACHE", "mem"),
        ("PPSF_LAYER_CACHE", "lay"),
    ):
        env[name] = str(tmp_path / folder)
        monkeypatch.setenv(name, env[name])
    return env


def test_help_and_config_errors_import_no_model_library_nor_torch(tmp_path, quiet_env) -> None:
    rc, imported, output = _imports_after(["--help"], quiet_env)
    assert rc == 0 and "usage: python -m trainers" in output and imported == []
    bad = tmp_path / "bad.toml"
    bad.write_text((REPO / "presets" / "demo.toml").read_text().replace("max_steps", "max_stepz"))
    rc, imported, output = _imports_after(["check", str(bad)], quiet_env)
    assert rc == 2 and "training.max_stepz: unknown key" in output
    assert imported == []


@pytest.mark.parametrize("preset", ["demo.toml", "demo-flux.toml", "demo-flux2.toml", "sdxl_24gb.toml"])
def test_check_imports_neither_torch_nor_a_model_library_once_its_tables_are_cached(
    preset, tmp_path, quiet_env, capsys, monkeypatch
) -> None:
    """The demo presets (their demo dataset generated in the child on first use) and a real-size SDXL
    preset (its measurements bundled): the dataset scan, the estimate and the notes need no torch."""
    estimate = importlib.import_module(
        "trainers.memory.estimate"
    )  # the module: the package exports a function
    argv = ["check", str(REPO / "presets" / preset), "--set", f"output_dir={tmp_path / 'runs'}"]
    if preset == "demo.toml":  # its name holds a finished run: the note reads the checkpoint's headers
        _finished_run(tmp_path / "runs" / "demo", step=10)
    checks._layers_of.cache_clear()
    # measurements an earlier test made in this process would not be written to this test's disk cache
    monkeypatch.setattr(estimate, "_MEMORY_CACHE", {})
    cli(argv)  # in this process: builds and caches the layer tables and memory measurements
    capsys.readouterr()  # and any notice a library prints when this process first imports it
    expected_rc = cli(argv)
    first = capsys.readouterr()
    quiet_env["PPSF_DEMO_DIR"] = str(tmp_path / "fresh-demo")  # the child generates the demo dataset again
    rc, imported, output = _imports_after(argv, quiet_env)
    assert imported == []
    assert rc == expected_rc  # and the same report:
    assert output.split("IMPORTED")[0] == first.out and output.endswith(first.err)
    if preset.startswith("demo"):
        assert rc == 0 and (tmp_path / "fresh-demo" / "shapes").is_dir()
    if preset == "demo.toml":
        assert "already holds a finished run (step 10)" in output
    checks._layers_of.cache_clear()


def _finished_run(run_dir: Path, step: int) -> None:
    """A run folder as a finished run leaves it: an intact checkpoint at `step`, the last event `done`."""
    from safetensors.numpy import save_file

    from trainers.checkpoint import CHECKPOINT_FILES, STATE_FILE, TrainerState, checkpoint_dir
    from trainers.events import EVENTS_FILE

    folder = checkpoint_dir(run_dir, step)
    folder.mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        save_file({"x": np.zeros(2, dtype=np.float32)}, str(folder / name))
    state = TrainerState(step=step, epoch=1, batch_in_epoch=0)
    (folder / STATE_FILE).write_text(json.dumps({"trainer": dataclasses.asdict(state), "param_groups": []}))
    (run_dir / EVENTS_FILE).write_text(json.dumps({"type": "done", "step": step, "exported": []}) + "\n")


def test_the_tiny_klein_vocabulary_is_counted_as_its_tokenizer_has_it() -> None:
    from trainers.models.families import tiny_qwen_vocab_size
    from trainers.tiny_flux import make_qwen_tokenizer

    assert tiny_qwen_vocab_size() == len(make_qwen_tokenizer())


def test_no_gpu_driver_means_no_card_and_no_torch(tmp_path, monkeypatch) -> None:
    from trainers.memory import report

    driver = tmp_path / "nvidiactl"
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(report, "GPU_DRIVER_PATHS", (str(driver),))
    monkeypatch.setitem(sys.modules, "torch", None)  # an import of torch would raise
    assert report.detected_card_bytes() is None
    driver.touch()
    assert report.gpu_driver_present()
    with pytest.raises(ImportError):  # a driver is there: torch is asked
        report.detected_card_bytes()
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not report.gpu_driver_present()
    monkeypatch.setattr(sys, "platform", "win32")
    assert report.gpu_driver_present()
