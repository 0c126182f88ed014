"""A stage's fingerprint covers everything it reads: every config key (a read of an undeclared key fails), every
file a declared path names (mutated file by file), and every first-party module it imports."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import PipelineConfig, load_config
from pipeline.fingerprint import ConfigView, UndeclaredConfigRead, stage_code, stage_state
from pipeline.hashing import HashCache
from pipeline.runner import UP_TO_DATE, Pipeline, StageCrashed
from pipeline.stage import StageContext, StageSpec
from stages import stage_specs
from tests.helpers.fake_stages import CALLS, SPECS


def _safetensors(tag: str) -> bytes:
    """A safetensors file with no tensors: the 8-byte header length, then the JSON header."""
    header = json.dumps({"__metadata__": {"tag": tag}}).encode()
    return len(header).to_bytes(8, "little") + header


SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def _model_folder(root: Path, name: str) -> Path:
    """A model folder's file set. Nothing is loaded (fingerprints hash bytes), but the files pass the folder check
    every stage runs before it starts: config.json, and safetensors shards the index names."""
    folder = root / name
    (folder / "sub").mkdir(parents=True)
    files = {
        "config.json": json.dumps({"model_type": "llama", "vocab_size": 32000, "hidden_size": 64,
                                   "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "intermediate_size": 128, "max_position_embeddings": 256}),
        "model.safetensors.index.json": json.dumps({"weight_map": {"a": SHARDS[0], "b": SHARDS[1]}}),
        "generation_config.json": "{}",
        "tokenizer.json": "{}",
        "tokenizer_config.json": "{}",
        "chat_template.jinja": "{{ messages }}",
        "sub/extra.bin": "nested",
    }
    for rel, text in files.items():
        (folder / rel).write_text(text, encoding="utf-8")
    for i, shard in enumerate(SHARDS):
        (folder / shard).write_bytes(_safetensors(f"weights {i + 1}"))
    return folder


@pytest.fixture()
def rich_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PipelineConfig:
    """Every stage enabled, and every key that names a file pointing at files in tmp_path."""
    monkeypatch.chdir(tmp_path)
    model = _model_folder(tmp_path, "base")
    sft_base = _model_folder(tmp_path, "sft_base")
    extra = _model_folder(tmp_path, "extra")
    tokenizer = _model_folder(tmp_path, "tok")
    for name in ("ja_train", "ja_heldout", "en_train", "en_heldout", "instruct", "instruct_heldout", "prompts"):
        (tmp_path / f"{name}.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
    return load_config(None, [
        f"model.path={model}", "model.from_config=null", f"model.tokenizer={tokenizer}",
        "data.ja.train=[ja_train.jsonl]", "data.ja.heldout=[ja_heldout.jsonl]",
        "data.en.train=[en_train.jsonl]", "data.en.heldout=[en_heldout.jsonl]",
        "sft.data=[instruct.jsonl]", "sft.heldout=[instruct_heldout.jsonl]", f"sft.base_model={sft_base}",
        f"evaluate.extra_models=[{extra}]", "evaluate.prompts=[prompts.jsonl]", "run.output_dir=out",
    ])


def _state(spec: StageSpec, cfg: PipelineConfig, cache: HashCache) -> dict[str, Any]:
    upstream = {name: {"outputs": {"x": {"sha256": "0" * 64}}} for name in (*spec.requires, *spec.uses)}
    return stage_state(spec, cfg, upstream, cache)


def _named_paths(value: Any, key: str, base: Path) -> list[tuple[str, Path]]:
    """(leaf key, path) for every existing file or folder that a string in a (nested) config value names."""
    if isinstance(value, dict):
        return [found for k, v in value.items() for found in _named_paths(v, f"{key}.{k}", base)]
    if isinstance(value, list):
        return [found for v in value for found in _named_paths(v, key, base)]
    if isinstance(value, str) and value and (base / value).exists():
        return [(key, (base / value).resolve())]
    return []


# The planner reads the architecture from model.path's config.json and nothing else of the model.
PLANNER_READS = {"model.path": "config.json"}


def _files_under(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("spec", stage_specs(), ids=lambda spec: spec.name)
def test_every_file_a_declared_key_names_is_fingerprinted(spec: StageSpec, rich_config: PipelineConfig,
                                                          tmp_path: Path) -> None:
    """Key by key: a declared param naming a file or folder brings all its files into the fingerprint (the
    planner excepted: it reads a model's config.json alone). File by file: changing one changes the state.
    Before the fix, cpt declared `model` but hashed no file of model.path."""
    cache = HashCache(tmp_path / "hashes.json")
    values = rich_config.model_dump(mode="json")
    before = _state(spec, rich_config, cache)
    hashed = {Path(p).resolve() for files in (spec.inputs(rich_config) if spec.inputs else {}).values() for p in files}
    named = {}
    for key in spec.params:
        node: Any = values
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        for leaf, path in _named_paths(node, key, tmp_path):
            named[path] = leaf
    assert named or spec.name == "tokenizer-report", f"{spec.name} reads no file?"
    for path, key in named.items():
        if spec.name == "plan":
            if key not in PLANNER_READS:
                continue
            expected = [path / PLANNER_READS[key]]
        else:
            expected = _files_under(path)
        missing = [p for p in expected if p.resolve() not in hashed]
        assert not missing, f"{spec.name}: {key} names {path}, but {missing} is not fingerprinted"
        for file in expected:
            original = file.read_bytes()
            file.write_bytes(original + b" \n")  # still valid JSON and safetensors: the folder check passes
            assert _state(spec, rich_config, cache)["inputs"] != before["inputs"], f"{spec.name}: {file}"
            file.write_bytes(original)
            os.utime(file, ns=(1, 1))  # new mtime: the hash cache re-reads it


def test_cpt_is_stale_when_the_weights_in_model_path_are_replaced(rich_config: PipelineConfig,
                                                                   tmp_path: Path) -> None:
    """The reported bug: same folder, new safetensors; cpt must rerun like sft does."""
    cpt = next(spec for spec in stage_specs() if spec.name == "cpt")
    cache = HashCache(tmp_path / "hashes.json")
    before = _state(cpt, rich_config, cache)
    (tmp_path / "base" / SHARDS[0]).write_bytes(_safetensors("new weights"))
    assert _state(cpt, rich_config, cache)["inputs"]["model.path"] != before["inputs"]["model.path"]


def test_code_fingerprint_follows_imports_the_specs_used_to_miss() -> None:
    """Modules the hand-written lists missed, found from the import statements (lazy ones included)."""
    code = {spec.name: stage_code(spec)[0] for spec in stage_specs()}
    assert {"pipeline.launch", "pipeline.models", "data.mixture"} <= set(code["cpt"])
    assert {"tokenizer.hf", "eval.multiple_choice", "eval.perplexity"} <= set(code["evaluate"])
    assert "data.instruct" in code["sft"]
    assert "pipeline.planner.memory" in code["plan"]
    # Importing `a.b` runs `a/__init__.py`: parent packages are part of the code.
    assert all("stages" in modules and "pipeline" in modules for modules in code.values())
    # A stage that imports no training code does not rerun when it changes.
    assert "pipeline.launch" not in code["prepare"] and "stages.cpt" not in code["prepare"]
    # Workers are launched by name, not imported: SPEC.worker makes them (and what they import) code.
    assert {"stages.cpt.worker", "stages.cpt.job", "pipeline.training"} <= set(code["cpt"])
    assert {"stages.sft.worker", "stages.sft.job", "pipeline.training"} <= set(code["sft"])
    # The run report's section is not the stage's output, and `if TYPE_CHECKING:` imports never run.
    assert "stages.prepare.report" not in code["prepare"] and "pipeline.reportkit" not in code["prepare"]


def test_each_stage_launches_the_worker_its_fingerprint_follows() -> None:
    """The worker a stage fingerprints is the module it launches: the same constant, not a second list."""
    import stages.cpt
    import stages.sft

    for module in (stages.cpt, stages.sft):
        assert module.SPEC.worker == module.WORKER
        assert "run_workers(WORKER," in Path(module.__file__).read_text(encoding="utf-8")


def test_library_versions_come_from_what_the_code_imports() -> None:
    libraries = {spec.name: stage_code(spec)[1] for spec in stage_specs()}
    assert {"torch", "transformers", "deepspeed", "safetensors"} <= set(libraries["cpt"])
    assert {"peft", "bitsandbytes"} <= set(libraries["sft"])
    assert "datatrove" in libraries["prepare"] and "deepspeed" not in libraries["prepare"]


# ------------------------------------------------------------------------------------------------ the view


def _spec(params: tuple[str, ...], unhashed: tuple[str, ...] = (), uses: tuple[str, ...] = ()) -> StageSpec:
    return StageSpec("cpt", lambda cfg, ctx: None, "test", params=params, unhashed=unhashed, uses=uses)


def test_view_refuses_undeclared_keys_and_names_them() -> None:
    cfg = load_config(None, [])
    view = ConfigView.of(cfg, _spec(("cpt.lr", "model")))
    assert view.cpt.lr == cfg.cpt.lr
    assert view.model is cfg.model  # a wholly declared section is the real object
    with pytest.raises(UndeclaredConfigRead, match="'cpt.seq_len'"):
        _ = view.cpt.seq_len
    with pytest.raises(UndeclaredConfigRead, match="'sft'"):
        _ = view.sft
    with pytest.raises(UndeclaredConfigRead, match="cpt.model_dump"):
        view.cpt.model_dump()
    with pytest.raises(AttributeError, match="read-only"):
        view.cpt = None


def test_a_declared_section_absent_from_the_yaml_reads_as_none() -> None:
    """evaluate declares sft.precision and sft.template and asks `cfg.sft is not None`; extend-vocab declares two
    tokenizer_report keys and takes `cfg.tokenizer_report or` the defaults. With the section absent from the YAML,
    both stages crashed with UndeclaredConfigRead (evaluate after scoring the first model)."""
    cfg = load_config(None, ["sft=null", "tokenizer_report=null"])
    specs = {spec.name: spec for spec in stage_specs()}
    assert ConfigView.of(cfg, specs["evaluate"]).sft is None
    assert ConfigView.of(cfg, specs["extend-vocab"]).tokenizer_report is None
    with pytest.raises(UndeclaredConfigRead, match="'sft'"):
        _ = ConfigView.of(cfg, _spec(("cpt.lr",))).sft  # a section the stage declares nothing of stays an error


def test_view_gives_a_section_whose_every_key_is_declared_whole() -> None:
    cfg = load_config(None, [])
    params = tuple(f"cpt.{key}" for key in type(cfg.cpt).model_fields if key != "master_port")
    assert isinstance(ConfigView.of(cfg, _spec(params)).cpt, ConfigView)
    view = ConfigView.of(cfg, _spec(params, unhashed=("cpt.master_port",)))
    assert view.cpt is cfg.cpt


def test_view_enabled_only_for_the_stages_it_reads() -> None:
    cfg = load_config(None, [])
    view = ConfigView.of(cfg, _spec(("cpt",), uses=("extend-vocab",)))
    assert view.enabled("extend-vocab") is cfg.enabled("extend-vocab")
    assert view.enabled("cpt") is True
    with pytest.raises(UndeclaredConfigRead, match="whether sft is enabled"):
        view.enabled("sft")


def test_a_stage_reading_an_undeclared_key_fails_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the fake-stage runner: a cpt that reads sft.lr, which it does not declare, crashes at the read and is
    not committed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ja.jsonl").write_text('{"text": "吾輩は猫である。"}\n', encoding="utf-8")
    CALLS.clear()

    def sneaky_cpt(cfg: PipelineConfig, ctx: StageContext) -> dict:
        (ctx.out_dir / "model.txt").write_text(f"{cfg.sft.lr}")
        return {}

    specs = [SPECS[0], StageSpec("cpt", sneaky_cpt, "reads sft.lr", requires=("prepare",), params=("cpt",),
                                 outputs=("model.txt",))]
    cfg = load_config(None, ["data.ja.train=[ja.jsonl]", "data.ja.heldout=[]", "run.output_dir=out"])
    with open(os.devnull, "w") as quiet:
        with pytest.raises(StageCrashed, match="reads config key 'sft'"):
            Pipeline(cfg, specs=specs, out=quiet).execute(["cpt"], force=set())
        prepare, cpt = Pipeline(cfg, specs=specs, out=quiet).statuses()
    assert prepare.state == UP_TO_DATE and cpt.state != UP_TO_DATE
