"""The bad-config table: each bad config makes `python -m trainers check` exit 2 with one named message,
no traceback, and nothing written anywhere. Plus what check must accept, and its warnings."""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import tomli_w
import torch
from PIL import Image

from trainers.__main__ import main as cli
from trainers.models import sdxl  # imported here: its import-time log lines must not meet a test's capture
from trainers.tiny_models import CLIP_CONFIG, UNET_CONFIG

DEFAULT_TARGETS = "['to_k', 'to_q', 'to_v', 'to_out.0']"


# ---------------------------------------------------------------- a workspace: model configs, images, config
def _write_model_folder(folder: Path) -> Path:
    """A diffusers folder with the tiny model's architecture configs and no weights: all check needs."""
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    for component, config in (
        ("unet", {"_class_name": "UNet2DConditionModel", **UNET_CONFIG}),
        ("text_encoder", {"architectures": ["CLIPTextModel"], **CLIP_CONFIG}),
        ("text_encoder_2", {"architectures": ["CLIPTextModelWithProjection"], **CLIP_CONFIG}),
    ):
        (folder / component).mkdir()
        (folder / component / "config.json").write_text(json.dumps(config))
    return folder


def _write_dataset(folder: Path) -> Path:
    for index, size in enumerate([(64, 64), (96, 64)]):
        (folder / "2_shapes").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (200, 10 * index, 10)).save(folder / "2_shapes" / f"{index}.png")
        (folder / "2_shapes" / f"{index}.txt").write_text(f"a red shape {index}", encoding="utf-8")
    return folder


def _safetensors_header_file(path: Path, keys: list[str]) -> Path:
    """A safetensors file whose header names `keys` (one float each): enough for a header-only check."""
    header = {
        key: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, key in enumerate(keys)
    }
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * (4 * len(keys)))
    return path


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = _write_model_folder(root / "model")
        self.data = _write_dataset(root / "data")
        self.runs = root / "runs"

    def config(self) -> dict:
        return {
            "name": "run",
            "output_dir": str(self.runs),
            "model": {"path": str(self.model)},
            "dataset": {"path": str(self.data), "resolution": 64},
            "lora": {"rank": 4},
            "training": {"max_steps": 2},
        }


def _set(data: dict, **sections) -> dict:
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return data


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and mtime: a changed, added or removed file shows."""
    found = {}
    for folder, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(folder) / name
            stat = path.lstat()
            found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


def _deny_writes_under(monkeypatch, folder: Path) -> None:
    """Make `folder` read-only to os.access (we run as root here, where chmod does not stop writes)."""
    real_access = os.access
    folder = str(folder)

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and (str(path) == folder or str(path).startswith(folder + os.sep)):
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


# ---------------------------------------------------------------- the table
# Each case: (id, change(workspace, config dict, monkeypatch) -> None or config file text, expected problem
# lines). Expected lines are format strings over the workspace ({root}, {model}, {data}, {runs}) or, for
# text a library writes, compiled patterns matched in full.
Change = Callable[[Workspace, dict, pytest.MonkeyPatch], str | None]


def _section(**sections) -> Change:
    return lambda ws, data, mp: _set(data, **sections) and None


def _model_file(keys: list[str] | None, name: str = "model.safetensors", raw: bytes = b"") -> Change:
    def change(ws: Workspace, data: dict, mp) -> None:
        path = ws.root / name
        if keys is None:
            path.write_bytes(raw)
        else:
            _safetensors_header_file(path, keys)
        data["model"]["path"] = str(path)

    return change


def _read_only(attribute: str, **sections) -> Change:
    def change(ws: Workspace, data: dict, mp) -> None:
        _set(data, **sections)
        _deny_writes_under(mp, getattr(ws, attribute))

    return change


def _raw_config(text: bytes) -> Change:
    def change(ws: Workspace, data: dict, mp) -> bytes:
        return text

    return change


def _metadata_not_utf8(ws: Workspace, data: dict, mp) -> None:
    (ws.data / "metadata.jsonl").write_bytes(
        '{"file_name": "2_shapes/0.png", "text": "café"}\n'.encode("cp1252")
    )


SD15_KEYS = [
    "model.diffusion_model.input_blocks.0.0.weight",
    "cond_stage_model.transformer.text_model.x.weight",
]
FLUX_KEYS = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]
NOT_SDXL = (
    "model.path: {root}/model.safetensors is not an SDXL checkpoint ({guess}: no model.diffusion_model.* / "
    "conditioner.embedders.1.* tensors); give an SDXL .safetensors checkpoint or a diffusers folder"
)
FUSED = (
    "optimizer.fused_back_pass steps inside each backward pass, so it cannot accumulate gradients: set "
    "training.gradient_accumulation = 1 (raise training.batch_size instead) or turn optimizer.fused_back_pass off"
)
NOT_A_NUMBER = "Input should be a valid {kind}; write the number without quotes"
EXTENSION = 'dataset.caption_extension: must name the caption files\' extension, e.g. ".txt" or ".caption"'
NAME = "name: {why} (got {given!r})"

CASES: list[tuple[str, Change, list[str | re.Pattern]]] = [
    # the ones check caught before
    (
        "unknown key",
        _section(dataset={"resolutoin": 64}),
        ["{config}: dataset.resolutoin: unknown key; did you mean 'resolution'?"],
    ),
    (
        "wrong type",
        _section(training={"max_steps": "many"}),
        ["{config}: training.max_steps: Input should be a valid integer (got 'many')"],
    ),
    (
        "resolution not a multiple of 64",
        _section(dataset={"resolution": 100}),
        ["{config}: dataset.resolution: must be a positive multiple of 64; try 128 (got 100)"],
    ),
    ("fused with accumulation", _section(training={"gradient_accumulation": 2}), ["{config}: " + FUSED]),
    (
        "missing model",
        _section(model={"path": "/nowhere/model"}),
        ["model.path: /nowhere/model does not exist"],
    ),
    (
        "missing dataset",
        _section(dataset={"path": "/nowhere/images"}),
        ["dataset.path: /nowhere/images does not exist"],
    ),
    # strict types
    (
        "number in quotes",
        _section(training={"max_steps": "100"}),
        ["{config}: training.max_steps: " + NOT_A_NUMBER.format(kind="integer") + " (got '100')"],
    ),
    (
        "float in quotes",
        _section(optimizer={"d_coef": "0.5"}),
        ["{config}: optimizer.d_coef: " + NOT_A_NUMBER.format(kind="number") + " (got '0.5')"],
    ),
    (
        "bool as a number",
        _section(training={"max_steps": True}),
        ["{config}: training.max_steps: Input should be a valid integer (got True)"],
    ),
    # sampling sizes
    (
        "sampling width not a multiple of 8",
        _section(sampling={"width": 100}),
        ["{config}: sampling.width: must be a positive multiple of 8; try 96 (got 100)"],
    ),
    (
        "sampling height zero",
        _section(sampling={"height": 0}),
        ["{config}: sampling.height: must be a positive multiple of 8; try 8 (got 0)"],
    ),
    (
        "sampling height negative",
        _section(sampling={"height": -64}),
        ["{config}: sampling.height: must be a positive multiple of 8; try 8 (got -64)"],
    ),
    # betas and finite numbers
    (
        "beta2 = 1",
        _section(optimizer={"betas": [0.9, 1.0]}),
        ["{config}: optimizer.betas: beta2 = 1.0 must be in [0, 1), e.g. betas = [0.9, 0.99]"],
    ),
    (
        "beta1 negative",
        _section(optimizer={"betas": [-0.1, 0.99]}),
        ["{config}: optimizer.betas: beta1 = -0.1 must be in [0, 1), e.g. betas = [0.9, 0.99]"],
    ),
    (
        "lr nan",
        _section(optimizer={"lr": float("nan")}),
        ["{config}: optimizer.lr: must be a finite number, not nan or inf (got nan)"],
    ),
    (
        "lr inf",
        _section(optimizer={"lr": float("inf")}),
        ["{config}: optimizer.lr: must be a finite number, not nan or inf (got inf)"],
    ),
    (
        "noise offset inf",
        _section(training={"noise_offset": float("inf")}),
        ["{config}: training.noise_offset: must be a finite number, not nan or inf (got inf)"],
    ),
    (
        "beta inside betas nan",
        _section(optimizer={"betas": [float("nan"), 0.99]}),
        ["{config}: optimizer.betas.0: must be a finite number, not nan or inf (got nan)"],
    ),
    # LoRA targets, against the architecture config (no weights)
    (
        "empty targets",
        _section(lora={"target_modules": []}),
        [f"lora.target_modules: empty, so nothing would train; name the layers, e.g. {DEFAULT_TARGETS}"],
    ),
    (
        "misspelt target",
        _section(lora={"target_modules": ["to_q", "to_qq"]}),
        ["lora.target_modules: 'to_qq' matches no layer a LoRA can go on in the unet; did you mean 'to_q'?"],
    ),
    (
        "target that is a block",
        _section(lora={"target_modules": ["attn1"]}),
        [
            "lora.target_modules: 'attn1' matches no layer a LoRA can go on in the unet; "
            "it is a block, not a layer; name its layers instead, e.g. 'to_k', 'to_out.0', 'to_q', 'to_v'"
        ],
    ),
    (
        "misspelt text-encoder target",
        _section(lora={"train_text_encoder": True, "text_encoder_target_modules": ["q_prj"]}),
        [
            "lora.text_encoder_target_modules: 'q_prj' matches no layer a LoRA can go on in the text_encoder; "
            "did you mean 'q_proj'?",
            "lora.text_encoder_target_modules: 'q_prj' matches no layer a LoRA can go on in the "
            "text_encoder_2; did you mean 'q_proj'?",
        ],
    ),
    # caption extension
    (
        "empty caption extension",
        _section(dataset={"caption_extension": ""}),
        ["{config}: " + EXTENSION + " (got '')"],
    ),
    (
        "dot caption extension",
        _section(dataset={"caption_extension": "."}),
        ["{config}: " + EXTENSION + " (got '.')"],
    ),
    # read-only folders
    (
        "read-only output_dir",
        _read_only("root"),
        [
            "output_dir: {root} cannot be written (read-only or not a folder), so the run folder {runs}/run "
            "cannot be made; choose a writable output_dir",
            "dataset.path: {data} is read-only, so the latent and text caches cannot be written in it; set "
            "dataset.cache_dir to a writable folder, or turn dataset.cache_latents and "
            "dataset.cache_text_embeddings off",
        ],
    ),
    (
        "read-only dataset with caches",
        _read_only("data"),
        [
            "dataset.path: {data} is read-only, so the latent and text caches cannot be written in it; set "
            "dataset.cache_dir to a writable folder, or turn dataset.cache_latents and "
            "dataset.cache_text_embeddings off"
        ],
    ),
    (
        "read-only cache_dir",
        _read_only("data", dataset={"cache_dir": "{data}/cache"}),
        [
            "dataset.cache_dir: {data} cannot be written (read-only or not a folder); choose a writable "
            "folder, or turn dataset.cache_latents and dataset.cache_text_embeddings off"
        ],
    ),
    # model files: read the header, never the weights
    (
        "model file not safetensors",
        _model_file(None, raw=b"PK\x03\x04 a zip, as torch.save writes"),
        [
            re.compile(
                r"model\.path: .*/model\.safetensors is not a safetensors file \(\w+: .*\); give an SDXL .*"
            )
        ],
    ),
    (
        "model .bin file",
        _model_file(None, name="model.bin", raw=b"\x80\x02 a pickle"),
        [re.compile(r"model\.path: .*/model\.bin is not a safetensors file \(\w+: .*\); give an SDXL .*")],
    ),
    (
        "SD 1.5 checkpoint",
        _model_file(SD15_KEYS),
        [NOT_SDXL.replace("{guess}", "it looks like a Stable Diffusion 1.x/2.x checkpoint")],
    ),
    ("Flux checkpoint", _model_file(FLUX_KEYS), [NOT_SDXL.replace("{guess}", "it looks like a Flux model")]),
    (
        "a LoRA given as the model",
        _model_file(["lora_unet_down_blocks_0_attn.lora_down.weight"]),
        [NOT_SDXL.replace("{guess}", "it looks like a LoRA, not a base model")],
    ),
    ("empty safetensors", _model_file([]), [NOT_SDXL.replace("{guess}", "it holds no tensors")]),
    # run names
    (
        "name too long",
        _section(name="n" * 101),
        ["{config}: " + NAME.format(why="is 101 characters long; keep it to 100 or fewer", given="n" * 101)],
    ),
    (
        "name with NUL",
        _section(name="run\0x"),
        [
            "{config}: "
            + NAME.format(
                why="contains a control character (NUL, tab, newline...); use a plain folder name",
                given="run\0x",
            )
        ],
    ),
    (
        "name only spaces",
        _section(name="   "),
        ["{config}: " + NAME.format(why="must be a folder name, not empty or only spaces", given="   ")],
    ),
    # bounds that used to hang or pass
    (
        "max_aspect huge",
        _section(dataset={"max_aspect": 1e30}),
        ["{config}: dataset.max_aspect: Input should be less than or equal to 8 (got 1e+30)"],
    ),
    # files that are not UTF-8
    (
        "config not UTF-8",
        _raw_config('name = "caf\xe9"\n'.encode("cp1252")),
        ["{config}: not UTF-8 text (invalid continuation byte at byte 11); save it as UTF-8"],
    ),
    (
        "metadata.jsonl not UTF-8",
        _metadata_not_utf8,
        [
            "dataset.path: {data}/metadata.jsonl: not UTF-8 text (invalid continuation byte at byte 44); "
            "save it as UTF-8"
        ],
    ),
    # every problem at once, from the schema and from the checks
    (
        "several schema problems",
        _section(sampling={"width": 12}, optimizer={"lr": float("nan"), "betas": [0.9, 2.0]}),
        [
            "{config}: optimizer.lr: must be a finite number, not nan or inf (got nan)",
            "{config}: optimizer.betas: beta2 = 2.0 must be in [0, 1), e.g. betas = [0.9, 0.99]",
            "{config}: sampling.width: must be a positive multiple of 8; try 16 (got 12)",
        ],
    ),
    (
        "several check problems",
        _read_only("data", dataset={"caption_extension": ".txt"}, lora={"target_modules": ["to_qq"]}),
        [
            "dataset.path: {data} is read-only, so the latent and text caches cannot be written in it; set "
            "dataset.cache_dir to a writable folder, or turn dataset.cache_latents and "
            "dataset.cache_text_embeddings off",
            "lora.target_modules: 'to_qq' matches no layer a LoRA can go on in the unet; did you mean 'to_q'?",
        ],
    ),
]


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    monkeypatch.setenv("PPSF_DEMO_DIR", str(tmp_path / "demo"))
    monkeypatch.chdir(tmp_path)
    return Workspace(tmp_path)


def _write_config(ws: Workspace, data: dict, raw: bytes | None = None) -> Path:
    path = ws.root / "config.toml"
    path.write_bytes(raw if raw is not None else tomli_w.dumps(data).encode())
    return path


def _fill(text: str, ws: Workspace, config: Path) -> str:
    return text.format(root=ws.root, model=ws.model, data=ws.data, runs=ws.runs, config=config)


@pytest.mark.parametrize("change, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_gets_named_messages_and_writes_nothing(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch, capsys, change: Change, expected: list
) -> None:
    data = workspace.config()
    raw = change(workspace, data, monkeypatch)
    for section in data.values():  # cases may name workspace folders in values
        if isinstance(section, dict):
            for key, value in section.items():
                if isinstance(value, str) and "{" in value:
                    section[key] = _fill(value, workspace, Path())
    config = _write_config(workspace, data, raw)
    before = _tree(workspace.root)

    code = cli(["check", str(config)])

    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("config problems:\n  ")
    lines = err.removeprefix("config problems:\n").rstrip("\n").split("\n")
    problems = [line.removeprefix("  ") for line in lines]
    assert len(problems) == len(expected), problems
    for problem, want in zip(problems, expected):
        if isinstance(want, re.Pattern):
            assert want.fullmatch(problem), problem
        else:
            assert problem == _fill(want, workspace, config)
    assert _tree(workspace.root) == before, "check wrote or changed files"


def test_the_table_covers_the_issue() -> None:
    assert len(CASES) >= 35


# ---------------------------------------------------------------- what check accepts
def test_good_config_passes_and_lists_the_layers_it_would_train(workspace: Workspace, capsys) -> None:
    data = _set(workspace.config(), optimizer={"lr": 1, "d_coef": 2, "betas": [0, 0.5]})  # ints for floats
    config = _write_config(workspace, data)
    before = _tree(workspace.root)

    assert cli(["check", str(config)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "2 images, 4 samples per epoch" in out and out.rstrip().endswith(f"{config}: ok")
    assert "warning" not in out
    assert _tree(workspace.root) == before


def test_set_overrides_are_toml_values(workspace: Workspace, capsys) -> None:
    config = _write_config(workspace, workspace.config())
    assert cli(["check", str(config), "--set", "optimizer.lr=1", "--set", "training.max_steps=100"]) == 0
    capsys.readouterr()
    assert cli(["check", str(config), "--set", 'training.max_steps="100"']) == 2
    assert "training.max_steps: Input should be a valid integer" in capsys.readouterr().err


def test_cache_dir_elsewhere_makes_a_read_only_dataset_fine(
    workspace: Workspace, monkeypatch, capsys
) -> None:
    _deny_writes_under(monkeypatch, workspace.data)
    data = _set(workspace.config(), dataset={"cache_dir": str(workspace.root / "cache")})
    assert cli(["check", str(_write_config(workspace, data))]) == 0, capsys.readouterr().err


def test_caches_off_make_a_read_only_dataset_fine(workspace: Workspace, monkeypatch, capsys) -> None:
    _deny_writes_under(monkeypatch, workspace.data)
    data = _set(workspace.config(), dataset={"cache_latents": False, "cache_text_embeddings": False})
    assert cli(["check", str(_write_config(workspace, data))]) == 0, capsys.readouterr().err


def test_relative_model_path_with_one_slash_is_local_and_says_so(workspace: Workspace, capsys) -> None:
    (workspace.root / "models").mkdir()
    workspace.model.rename(workspace.root / "models" / "sdxl")
    data = _set(workspace.config(), model={"path": "models/sdxl"})
    assert cli(["check", str(_write_config(workspace, data))]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert (
        f"warning: model.path: 'models/sdxl' is read as the local folder {workspace.root}/models/sdxl, not as the "
        "Hugging Face repo of that name (write ./models/sdxl to make that plain)"
    ) in out

    from trainers.paths import resolve_model_path

    assert resolve_model_path("models/sdxl") == str(workspace.root / "models" / "sdxl")
    assert resolve_model_path("someone/sdxl") == "someone/sdxl"  # not here: a Hub repo id


def test_sdxl_checkpoint_header_passes(workspace: Workspace, capsys) -> None:
    path = _safetensors_header_file(
        workspace.root / "sdxl.safetensors",
        ["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.1.model.ln_final.weight"],
    )
    data = _set(workspace.config(), model={"path": str(path)})
    assert cli(["check", str(_write_config(workspace, data))]) == 0, capsys.readouterr().err


def test_oversized_rank_warns_with_the_lora_size(workspace: Workspace, capsys) -> None:
    """The size is checked against peft's own LoRA on the real tiny UNet (an independent count)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model

    rank = 64
    unet = UNet2DConditionModel(**UNET_CONFIG)
    targeted = [
        m
        for n, m in unet.named_modules()
        if isinstance(m, torch.nn.Linear) and n.endswith(("to_k", "to_q", "to_v", "to_out.0"))
    ]
    widest = max(min(m.in_features, m.out_features) for m in targeted)
    inject_adapter_in_model(LoraConfig(r=rank, target_modules=["to_k", "to_q", "to_v", "to_out.0"]), unet)
    lora_params = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    assert widest < rank

    data = _set(workspace.config(), lora={"rank": rank}, saving={"dtype": "fp16"})
    assert cli(["check", str(_write_config(workspace, data))]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    megabytes = lora_params * 2 / 2**20
    assert (
        f"warning: lora.rank: {rank} is more than the full rank of {len(targeted)} of the {len(targeted)} "
        f"targeted layers (their full rank is at most {widest}), so those learn nothing a smaller rank could "
        f"not; the LoRA would be {megabytes:.1f} MB in fp16."
    ) in out

    capsys.readouterr()
    data = _set(workspace.config(), lora={"rank": widest})
    assert cli(["check", str(_write_config(workspace, data))]) == 0
    assert "lora.rank" not in capsys.readouterr().out


# ---------------------------------------------------------------- train and the UI's Check say the same
def test_train_refuses_before_loading_anything(workspace: Workspace, capsys, monkeypatch) -> None:
    def no_loading(self):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sdxl.SDXLAdapter, "load", no_loading)
    data = _set(workspace.config(), lora={"target_modules": ["to_qq"]})
    assert cli(["train", str(_write_config(workspace, data))]) == 2
    err = capsys.readouterr().err
    assert "lora.target_modules: 'to_qq' matches no layer" in err and "Traceback" not in err


def test_the_ui_check_reports_the_same_problems(workspace: Workspace) -> None:
    from app.preflight import preflight
    from trainers.config import validate_config

    config = validate_config(_set(workspace.config(), lora={"target_modules": ["to_qq"]}))
    problems, _ = preflight(config, workspace.runs)
    assert (
        "lora.target_modules: 'to_qq' matches no layer a LoRA can go on in the unet; did you mean 'to_q'?"
        in problems
    )
