"""The pipeline YAML as typed, validated settings.

One YAML describes a run: `run`, `model`, `data`, and one section per stage. A stage section that is absent
means the stage is not part of this pipeline; `enabled: false` keeps its settings but skips it.

Validation is strict: unknown keys and wrong types are errors (an int is accepted where a float is expected,
nothing else is coerced), and every message names the file, the line and the key path.
"""

from __future__ import annotations

import difflib
import math
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import JpadaptError
from pipeline.yamlio import dump_yaml, key_lines, parse_yaml, read_yaml_file

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"


class Section(BaseModel):
    # No .inf or .nan anywhere: an infinite learning rate or epoch count validates, then fails hours later.
    model_config = ConfigDict(strict=True, extra="forbid", validate_assignment=True, allow_inf_nan=False)


class StageSection(Section):
    enabled: bool = Field(True, description="False keeps the settings but skips the stage.")


def _floats(value: Any, key: str = "") -> list[tuple[str, float]]:
    """(dotted key within `value`, value) of every float inside free-form settings such as model.from_config."""
    if isinstance(value, float):
        return [(key, value)]
    if isinstance(value, dict):
        return [pair for sub, item in value.items() for pair in _floats(item, f"{key}.{sub}".lstrip("."))]
    if isinstance(value, list):
        return [pair for index, item in enumerate(value) for pair in _floats(item, f"{key}.{index}".lstrip("."))]
    return []


def _as_list(value: Any) -> Any:
    """Let a single path be written without list brackets."""
    return [value] if isinstance(value, str) else value


# --------------------------------------------------------------------------------------------- run, model, data


class RunConfig(Section):
    name: str = Field(description="Run directory name under output_dir.")
    seed: int = Field(1234, ge=0, description="Base seed; each process adds its rank.")
    output_dir: str = Field("runs", description="Parent folder of run directories (relative to the working dir).")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError("must start with a letter or digit and hold only letters, digits, '.', '_' and '-'")
        return value


class ModelConfig(Section):
    path: str | None = Field(None, description="Local Hugging Face model folder (config.json + safetensors).")
    from_config: dict[str, Any] | None = Field(
        None, description="Build a randomly initialised model from these HF config values (demos, tests)."
    )
    preset: str | None = Field(None, description="Planner preset (architecture numbers only) when no folder exists.")
    tokenizer: str | None = Field(
        None, description="Bundled tokenizer name (llama2, llama3, qwen, llm-jp, mistral) or a path; default: path."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = Field(False, description="Run model code shipped inside the folder. Off unless needed.")

    @field_validator("from_config")
    @classmethod
    def _finite(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for key, number in _floats(value):
            if not math.isfinite(number):
                raise ValueError(f"{key} is {number}: only finite numbers can build a model")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.path is not None and self.from_config is not None:
            raise ValueError("give either model.path or model.from_config, not both")
        return self


class CorpusConfig(Section):
    train: list[str] = Field(min_length=1, description="Files or globs: .jsonl, .txt, .parquet (.gz/.xz allowed).")
    heldout: list[str] = Field(
        default_factory=list, description="Held-out files; if empty, prepare splits off prepare.heldout_fraction."
    )
    format: Literal["auto", "jsonl", "text", "parquet"] = Field("auto", description="auto: from the file suffix.")
    text_field: str = Field("text", description="Field holding the text in JSONL/Parquet records.")
    id_field: str | None = Field("id", description="Records sharing this field's value stay in one split.")
    text_unit: Literal["file", "paragraph", "line"] = Field(
        "paragraph", description="Plain text only: what one document is (paragraphs are blank-line separated)."
    )

    _lists = field_validator("train", "heldout", mode="before")(_as_list)


class DataConfig(Section):
    ja: CorpusConfig
    en: CorpusConfig | None = Field(None, description="English replay corpus (needed when cpt.replay_ratio > 0).")


# --------------------------------------------------------------------------------------------- stages


class DedupConfig(Section):
    exact: bool = Field(True, description="Drop documents whose normalized text was already seen.")
    near: bool = Field(True, description="Drop near-duplicates (MinHash LSH over character n-grams, on disk).")
    threshold: float = Field(0.8, gt=0, le=1, description="Documents whose estimated Jaccard similarity is at or above this are duplicates.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (accuracy vs speed).")
    ngram: int = Field(5, ge=1, le=64, description="Character n-gram (shingle) length.")


class SlurmConfig(Section):
    partition: str | None = Field(None, description="Slurm partition (None: the cluster's default).")
    time: str = Field("24:00:00", description="Time limit of one task (sbatch --time).")
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: float = Field(2, gt=0)
    job_name: str = Field("jpadapt-prepare")
    env_command: str | None = Field(
        None, description="Shell line run before each task, e.g. 'source /shared/jpadapt/.venv/bin/activate'."
    )
    sbatch_args: dict[str, str] = Field(default_factory=dict, description="Extra #SBATCH options, e.g. {account: abc}.")
    max_array_size: int = Field(1001, ge=1, description="The cluster's MaxArraySize: larger task sets are split.")


class RayConfig(Section):
    address: str | None = Field(
        None, description="Ray cluster to join ('auto', 'HOST:6379'); None starts a private one on this machine."
    )
    cpus_per_task: int = Field(1, ge=1)


class PrepareConfig(StageSection):
    normalization: Literal["NFKC", "NFC", "NFKD", "NFD", "none"] = "NFKC"
    min_chars: int = Field(50, ge=1, description="Drop documents shorter than this (after normalization).")
    max_chars: int = Field(2_000_000, ge=1, description="Drop documents longer than this.")
    min_japanese_ratio: float = Field(
        0.5, ge=0, le=1, description="Japanese side: minimum share of kana/kanji among non-space characters."
    )
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    heldout_fraction: float = Field(0.05, gt=0, lt=1, description="Held-out share when no held-out file is given.")
    shard_size_mb: int = Field(64, ge=1, description="Maximum size of one output shard.")
    on_error: Literal["fail", "skip"] = Field("fail", description="Corrupt line: stop with an error, or count it.")
    # Where and how wide the work runs. None of these change a byte of the outputs (tested), so none of them
    # reruns the stage: see EXECUTOR_KEYS.
    executor: Literal["local", "slurm", "ray"] = Field("local", description="Run the tasks here, on Slurm or on Ray.")
    workers: int | None = Field(
        None, ge=1, description="local or a private Ray: tasks at once (None: every CPU core of this machine)."
    )
    tasks: int | None = Field(
        None, ge=1, description="Parallel pieces of work (None: one per input file, at most 256; a file is never split)."
    )
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _lengths(self) -> PrepareConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"prepare.min_chars ({self.min_chars}) is larger than prepare.max_chars ({self.max_chars})")
        return self


# prepare keys that decide where the work runs, not what it writes.
EXECUTOR_KEYS = ("executor", "workers", "tasks", "slurm", "ray")

BUNDLED_TOKENIZERS = ("llama2", "llama3", "qwen", "llm-jp", "mistral")


class TokenizerReportConfig(StageSection):
    tokenizers: dict[str, str] = Field(
        default_factory=lambda: {name: name for name in BUNDLED_TOKENIZERS},
        description="Display name -> bundled tokenizer name or path.",
    )
    baseline: str = Field("llama2", description="Costs are reported relative to this tokenizer.")
    compute_params: int = Field(7_000_000_000, gt=0, description="N in 6*N*D when comparing training compute.")
    context_length: int = Field(4096, gt=0, description="Context size for the 'characters per context' figure.")
    max_documents: int | None = Field(None, gt=0, description="Use only the first N held-out documents.")

    @model_validator(mode="after")
    def _baseline_known(self) -> TokenizerReportConfig:
        if self.baseline not in self.tokenizers:
            raise ValueError(f"baseline {self.baseline!r} is not one of the tokenizers {sorted(self.tokenizers)}")
        return self


class ExtendVocabConfig(StageSection):
    new_tokens: int = Field(16000, gt=0, description="Japanese tokens to add to the base vocabulary.")
    algorithm: Literal["bpe", "unigram"] = Field(
        "bpe", description="Candidate model for SentencePiece bases (unigram bases need unigram); byte-level BPE "
        "bases always continue BPE."
    )
    morpheme_pretokenize: bool = Field(True, description="Learn on fugashi morphemes: no new token crosses one.")
    pad_to_multiple_of: int = Field(64, ge=1, description="Model vocabulary padded to a multiple of this.")
    init: Literal["mean", "random", "focus"] = Field("mean", description="How new embedding rows start.")
    max_training_chars: int | None = Field(None, gt=0, description="Cap on the text used to learn candidates.")


class PlanConfig(StageSection):
    gpu: str = Field("H100-80GB", description="GPU kind from the planner's catalog.")
    mfu: float = Field(0.4, gt=0, le=1, description="Model FLOPs utilisation assumed for time estimates.")
    price_per_gpu_hour: float = Field(2.5, ge=0, description="US$ per GPU-hour for cost estimates.")


class CptConfig(StageSection):
    replay_ratio: float = Field(0.1, ge=0, lt=1, description="Share of English tokens in the training mixture.")
    seq_len: int = Field(2048, ge=8)
    micro_batch_size: int = Field(1, ge=1, description="Sequences per GPU per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro batches per optimizer step.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; default: what train_tokens implies.")
    train_tokens: int | None = Field(None, gt=0, description="Token budget of the stage.")
    lr: float = Field(1e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decays to lr * min_lr_ratio.")
    warmup_steps: int = Field(100, ge=0, description="Re-warming steps from 0 to lr.")
    weight_decay: float = Field(0.1, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    gradient_checkpointing: bool = True
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = Field(False, description="ZeRO-3 only.")
    num_gpus: int = Field(1, ge=1, description="Processes per node.")
    num_nodes: int = Field(1, ge=1)
    hostfile: str | None = Field(
        None, description="DeepSpeed hostfile for its ssh launcher (num_nodes > 1 without per-node launch).")
    master_port: int = Field(29500, ge=1024, le=65535)
    accelerator: Literal["auto", "cuda", "cpu"] = "auto"
    eval_every: int = Field(100, ge=1, description="Steps between points of the JA/EN forgetting curve.")
    eval_chars: int | None = Field(
        200_000, ge=1, description="Held-out characters per language in each evaluation, documents in order (null: all)."
    )
    save_every: int = Field(500, ge=1, description="Steps between DeepSpeed checkpoints (resume after a crash).")
    keep_checkpoints: int = Field(2, ge=1, description="How many of the newest checkpoints to keep.")

    @field_validator("adam_betas", mode="before")
    @classmethod
    def _betas_from_list(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @model_validator(mode="after")
    def _consistent(self) -> CptConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3 (only ZeRO-3 partitions the parameters)")
        if self.max_steps is None and self.train_tokens is None:
            raise ValueError("give max_steps or train_tokens (how long to train)")
        return self


class PromptTemplateConfig(Section):
    """The Japanese instruction format used when the tokenizer has no chat template of its own. It is turned
    into a chat template and saved with the tokenizer, so inference renders prompts exactly as training did."""

    system: str = Field(
        "以下に、あるタスクを説明する指示があります。リクエストを適切に完了するための回答を記述してください。",
        description="Preamble before the first instruction (a system message replaces it).",
    )
    instruction: str = Field("### 指示:", description="Marker before each instruction (user turn).")
    input: str = Field("### 入力:", description="Marker before a record's optional `input` (context).")
    response: str = Field("### 応答:", description="Marker after which the model answers; loss starts after it.")

    @model_validator(mode="after")
    def _markers(self) -> PromptTemplateConfig:
        if not self.response.strip():
            raise ValueError("the template has no response marker (template.response is empty): the model could "
                             "not tell where its answer starts, and the loss mask would have nothing to anchor on")
        if not self.instruction.strip():
            raise ValueError("template.instruction is empty: every instruction needs a marker")
        markers = {"instruction": self.instruction, "input": self.input, "response": self.response}
        for name, marker in markers.items():
            if name != "response" and marker.strip() and self.response.strip() in marker:
                raise ValueError(f"template.{name} ({marker!r}) contains the response marker ({self.response!r})")
        return self


class SftConfig(StageSection):
    data: list[str] = Field(
        default_factory=lambda: ["bundled:instruct/ja_instruct_train.jsonl"],
        description="Instruction (instruction/input/output) or chat (messages) JSONL files.",
    )
    heldout: list[str] = Field(
        default_factory=lambda: ["bundled:instruct/ja_instruct_heldout.jsonl"],
        description="Held-out examples in the same formats: held-out loss and the report's generations.",
    )
    base_model: str | None = Field(None, description="HF folder to tune; default: the cpt output, else model.path.")
    prompt_format: Literal["auto", "chat_template", "template"] = Field(
        "auto", description="auto: the tokenizer's chat template if it has one, else `template`."
    )
    template: PromptTemplateConfig = Field(default_factory=PromptTemplateConfig)
    max_seq_len: int = Field(1024, ge=8, description="Longer examples are truncated (counted in the summary).")
    packing: bool = Field(
        True, description="Several examples per sequence (positions restart, no attention across examples); "
        "false: one example per sequence, batches grouped by length."
    )
    quantization: Literal["nf4", "none"] = Field("nf4", description="nf4 = QLoRA, none = plain LoRA.")
    precision: Literal["bf16", "fp32"] = Field("bf16", description="Compute dtype (fp32 is for CPUs without bf16).")
    lora_r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names that get LoRA adapters (all-linear: every linear layer but lm_head)."
    )
    train_new_tokens: bool = Field(
        True, description="When the vocabulary was extended, train the new tokens' embedding rows (only those)."
    )
    lr: float = Field(2e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decays to lr * min_lr_ratio.")
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    epochs: float = Field(1.0, gt=0, description="Passes over the data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0)
    micro_batch_size: int = Field(4, ge=1, description="Sequences per GPU per forward pass.")
    grad_accum: int = Field(4, ge=1)
    optimizer: Literal["paged_adamw_8bit", "adamw_8bit", "adamw"] = "paged_adamw_8bit"
    gradient_checkpointing: bool = True
    num_gpus: int = Field(1, ge=1, description="Data-parallel processes (DeepSpeed ZeRO).")
    num_nodes: int = Field(1, ge=1)
    hostfile: str | None = Field(
        None, description="DeepSpeed hostfile for its ssh launcher (num_nodes > 1 without per-node launch).")
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="2 shards the adapters' gradients and optimizer states.")
    master_port: int = Field(29510, ge=1024, le=65535)
    accelerator: Literal["auto", "cuda", "cpu"] = "auto"
    eval_every: int = Field(50, ge=1, description="Steps between held-out loss evaluations.")
    eval_examples: int | None = Field(200, gt=0, description="Held-out examples scored (null: all).")
    generate: int = Field(5, ge=0, description="Held-out prompts answered greedily at the end, for the report.")
    max_new_tokens: int = Field(128, ge=1)
    merge: bool = Field(False, description="Also save base + LoRA merged into a plain bf16 model folder.")

    _lists = field_validator("data", "heldout", mode="before")(_as_list)

    @model_validator(mode="after")
    def _consistent(self) -> SftConfig:
        if self.quantization == "nf4" and self.zero_stage == 3:
            raise ValueError(
                "QLoRA (quantization nf4) cannot run under ZeRO-3: ZeRO-3 partitions parameters as float tensors "
                "and cannot shard bitsandbytes 4-bit weights; use zero_stage 2 or quantization none"
            )
        if self.zero_stage == 3:
            raise ValueError("sft runs ZeRO 0-2: the adapters are small, so ZeRO-3's parameter sharding would only "
                             "add gathers to every layer; use zero_stage 2")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is empty: name module names, or use all-linear")
        return self


def _default_tasks() -> tuple[str, ...]:
    from eval.tasks import DEFAULT_TASKS

    return DEFAULT_TASKS


class EvaluateConfig(StageSection):
    """Every model the run produced (base, extend-vocab, cpt, sft adapter) plus `extra_models`, side by side:
    held-out bits per byte, the bundled benchmark suite (JA and EN tasks under published prompts) and greedy
    generations."""

    extra_models: list[str] = Field(default_factory=list, description="More local HF folders to put in the table.")
    max_documents: int | None = Field(None, gt=0, description="Held-out documents per language for bits per byte.")
    max_chars: int | None = Field(200_000, gt=0, description="Held-out characters per language (the last "
                                  "document is cut to fit); null: all.")
    window: int = Field(1024, ge=8, description="Sliding-window length for long documents (capped at the "
                        "model's positions).")
    stride: int = Field(512, ge=1, description="Tokens scored per window after the first.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")
    tasks: list[str] = Field(default_factory=lambda: list(_default_tasks()), description="Bundled benchmark "
                             "tasks (eval.tasks): the harness's task names (ja_leaderboard_jcommonsenseqa, hellaswag, "
                             "gsm8k, ...) or jpadapt's own prompts (jcommonsenseqa, jnli).")
    num_fewshot: list[int] | None = Field(None, description="Solved examples before each question, one evaluation "
                                          "per entry for every task; null: each task's published count.")
    limit: int | None = Field(None, gt=0, description="Score only the first N items of each task.")
    max_gen_tokens: int | None = Field(None, ge=1, description="Cap on the tokens generated per answer of a "
                                       "generative task; null: each task's own limit.")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="More tasks run through "
                                     "lm-evaluation-harness (the [lm-eval] extra) on the same models.")
    lm_eval_include_path: str | None = Field(None, description="A folder of local lm-evaluation-harness task "
                                             "YAMLs (point their datasets at local files: nothing is downloaded).")
    lm_eval_num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples for every lm_eval_tasks "
                                            "task; null: each task YAML's own num_fewshot.")
    prompts: list[str] = Field(default_factory=lambda: ["bundled:eval/prompts.jsonl"],
                               description="JSONL prompts for greedy generations; [] for none.")
    max_new_tokens: int = Field(64, ge=1)
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: each folder's own dtype.")
    accelerator: Literal["auto", "cuda", "cpu"] = "auto"

    @model_validator(mode="after")
    def _stride(self) -> EvaluateConfig:
        if self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) is larger than window ({self.window})")
        if self.num_fewshot is not None:
            if any(k < 0 for k in self.num_fewshot):
                raise ValueError(f"num_fewshot entries must be 0 or more, got {self.num_fewshot}")
            if len(set(self.num_fewshot)) != len(self.num_fewshot) or not self.num_fewshot:
                raise ValueError(f"num_fewshot must list distinct values (or be null), got {self.num_fewshot}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks lists a task twice: {self.tasks}")
        if len(set(self.lm_eval_tasks)) != len(self.lm_eval_tasks):
            raise ValueError(f"lm_eval_tasks lists a task twice: {self.lm_eval_tasks}")
        return self

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        from eval.tasks import get_task

        for name in tasks:
            try:
                get_task(name)
            except JpadaptError as exc:
                raise ValueError(str(exc)) from None
        return tasks

    def shots(self, task: Any) -> list[int]:
        """The few-shot counts an eval.tasks.TaskSpec is evaluated at: num_fewshot, else its published count."""
        return task.shot_counts(list(self.num_fewshot) if self.num_fewshot is not None else [task.num_fewshot])


# --------------------------------------------------------------------------------------------- the whole file

STAGE_SECTIONS = ("prepare", "tokenizer_report", "extend_vocab", "plan", "cpt", "sft", "evaluate")


class PipelineConfig(Section):
    run: RunConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    prepare: PrepareConfig | None = None
    tokenizer_report: TokenizerReportConfig | None = None
    extend_vocab: ExtendVocabConfig | None = None
    plan: PlanConfig | None = None
    cpt: CptConfig | None = None
    sft: SftConfig | None = None
    evaluate: EvaluateConfig | None = None

    def section(self, stage: str) -> StageSection | None:
        return getattr(self, stage.replace("-", "_"))

    def enabled(self, stage: str) -> bool:
        section = self.section(stage)
        return section is not None and section.enabled



def cross_section_problems(cfg: PipelineConfig) -> list[tuple[tuple[str, ...], str]]:
    """Rules that span sections, as (key path, message) so errors can point at the right line."""
    problems = []
    has_model = cfg.model.path is not None or cfg.model.from_config is not None
    if cfg.enabled("cpt"):
        if cfg.cpt.replay_ratio > 0 and cfg.data.en is None:
            problems.append(
                (("cpt", "replay_ratio"), f"is {cfg.cpt.replay_ratio} but data.en (the English replay corpus) is missing")
            )
        if not has_model:
            problems.append((("cpt",), "needs a model: set model.path or model.from_config"))
    if cfg.enabled("sft") and not has_model and cfg.sft.base_model is None and not cfg.enabled("cpt"):
        problems.append((("sft",), "needs a model: set model.path, model.from_config or sft.base_model"))
    if cfg.enabled("extend_vocab") and cfg.model.tokenizer is None and cfg.model.path is None:
        problems.append((("extend_vocab",), "needs a base tokenizer: set model.tokenizer or model.path"))
    return problems


# --------------------------------------------------------------------------------------------- loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """`cpt.lr=1e-5` -> (["cpt", "lr"], 1e-5); the value is read as YAML so types work as in the file."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise JpadaptError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. cpt.lr=1e-5")
    return key.split("."), parse_yaml(raw, f"override {item!r}") if raw else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict[tuple[str, ...], str]:
    """Set each dotted override in the raw mapping; return {key path: override text} for error messages."""
    origins: dict[tuple[str, ...], str] = {}
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise JpadaptError(f"override {item!r}: {where} is a value, not a section")
            node = child
        node[path[-1]] = value
        origins[tuple(path)] = item
    return origins


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override and validate a pipeline YAML (the bundled demo when `path` is None)."""
    path = DEFAULT_CONFIG if path is None else path
    raw, text = read_yaml_file(path)
    if raw is None:
        raise JpadaptError(f"{path}: the file is empty")
    if not isinstance(raw, dict):
        raise JpadaptError(f"{path}: the top level must be a mapping of sections (run, model, data, ...)")
    origins = apply_overrides(raw, overrides or [])
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise JpadaptError(_describe(exc, path, text, origins)) from None
    problems = cross_section_problems(cfg)
    if problems:
        lines = key_lines(text)
        raise JpadaptError(
            "\n".join(f"{_where(loc, path, lines, origins)}: {'.'.join(loc)}: {msg}" for loc, msg in problems)
        )
    return cfg


def resolved_yaml(cfg: PipelineConfig) -> str:
    """The fully resolved config (defaults filled in), as saved into the run directory."""
    return dump_yaml(cfg.model_dump(mode="json", exclude_none=False))


# --------------------------------------------------------------------------------------------- error messages


def _describe(exc: ValidationError, path: Path, text: str, origins: dict[tuple[str, ...], str]) -> str:
    """One line per problem: `file:line: key.path: what is wrong`, or the override that caused it."""
    lines = key_lines(text)
    messages = []
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"] if not _is_union_tag(part))
        messages.append(f"{_where(loc, path, lines, origins)}: {_explain(error, loc)}")
    return "\n".join(dict.fromkeys(messages))


def _is_union_tag(part: Any) -> bool:
    # pydantic inserts the union member's name into the location (e.g. 'list[str]'); users never wrote those.
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "literal"})


def _where(loc: tuple[str, ...], path: Path, lines: dict, origins: dict) -> str:
    for origin, item in origins.items():
        shared = min(len(origin), len(loc))
        if shared and origin[:shared] == loc[:shared]:
            return f"override {item!r}"
    for length in range(len(loc), 0, -1):
        if loc[:length] in lines:
            return f"{path}:{lines[loc[:length]]}"
    return str(path)


def _explain(error: dict, loc: tuple[str, ...]) -> str:
    key = ".".join(loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        known = _known_keys(loc[:-1])
        hint = difflib.get_close_matches(loc[-1], known, n=1)
        suggestion = f" (did you mean {'.'.join((*loc[:-1], hint[0]))!r}?)" if hint else f" (known: {', '.join(known)})"
        return f"{key}: unknown key{suggestion}"
    if kind == "missing":
        return f"{key}: required key is missing"
    if kind in {"model_type", "dict_type"}:
        return f"{key}: must be a section (a mapping of keys)"
    message = str(error["msg"]).replace("Input should be", "must be").replace("Value error, ", "")
    if kind in {"value_error", "assertion_error"} and loc == ():
        return message
    got = error.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None and kind != "none_required" else f" (got {got!r})"
    return f"{key}: {message}{shown}"


def _known_keys(loc: tuple[str, ...]) -> list[str]:
    model: Any = PipelineConfig
    for part in loc:
        field = model.model_fields.get(part) if _is_model(model) else None
        if field is None:
            return []
        model = _model_in(field.annotation)
    return sorted(model.model_fields) if _is_model(model) else []


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def _model_in(annotation: Any) -> Any:
    """The BaseModel inside `X | None` annotations, if any."""
    if _is_model(annotation):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        for arg in get_args(annotation):
            if _is_model(arg):
                return arg
    return None
