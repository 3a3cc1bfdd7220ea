"""Read a local model folder: sentence-transformers layout or a plain transformers folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.manifest import sha256_file

POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# sentence-transformers' names in `pooling_mode` -> ours, where they differ.
POOLING_NAMES = {"mean_sqrt_len_tokens": "mean_sqrt_len"}
# Models whose position ids start after the padding index, so two positions are unusable.
OFFSET_POSITION_TYPES = {"roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "xlm-roberta-xl"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# The Transformer module's config, under the names sentence-transformers 6 tries, in its order (the first
# that exists and is not empty wins; the legacy names come from its model-specific predecessors).
ST_CONFIG_NAMES = ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json",
                   "sentence_camembert_config.json", "sentence_albert_config.json",
                   "sentence_xlm-roberta_config.json", "sentence_xlnet_config.json")
# processing_kwargs keys a text model may set: "max_length" changes the truncation, these others change nothing
# the artifact computes. Any other key could change the tokens and is refused.
PROCESSING_KEYS = {"max_length", "padding", "return_tensors"}
# Config keys some architectures spell differently (DistilBERT: dim, n_layers, n_heads).
CONFIG_ALIASES = {"hidden_size": ("dim", "d_model"), "num_hidden_layers": ("n_layers", "num_layers"),
                  "num_attention_heads": ("n_heads", "num_heads")}
ACTIVATIONS = {"torch.nn.modules.activation.Tanh": "tanh", "torch.nn.modules.linear.Identity": "identity",
               "torch.nn.modules.activation.ReLU": "relu", "torch.nn.modules.activation.Sigmoid": "sigmoid",
               "torch.nn.modules.activation.GELU": "gelu"}


@dataclass
class DenseSpec:
    path: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str


@dataclass
class Source:
    """What the exporter needs to know about a model folder."""

    path: Path
    kind: str  # "sentence-transformers" | "transformers"
    transformer_path: Path
    config: dict
    pooling: list[str]
    normalize: bool
    dense: list[DenseSpec] = field(default_factory=list)
    max_length: int | None = 512  # None: nothing in the folder bounds it (export then needs max_length)
    lowercase: bool = False
    # sentence-transformers' prompts (config_sentence_transformers.json) and Pooling's include_prompt
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    include_prompt: bool = True
    # sentence_bert_config.json's keyword arguments for AutoTokenizer (processor_kwargs, formerly tokenizer_args)
    tokenizer_kwargs: dict = field(default_factory=dict)
    # config_sentence_transformers.json's truncate_dim: sentence-transformers' encode returns that many components
    truncate_dim: int | None = None

    @property
    def hidden_size(self) -> int:
        """Width of the transformer's token embeddings."""
        value = config_value(self.config, "hidden_size")
        if value is None:
            raise ValueError(f"{self.transformer_path / 'config.json'} gives no hidden size")
        return int(value)

    def weight_hashes(self) -> dict[str, str]:
        """sha256 of every weights file the export reads: the single file, or a sharded checkpoint's index
        and every shard it names."""
        out = {}
        folders = [self.transformer_path] + [d.path for d in self.dense]
        for folder in folders:
            for name in WEIGHT_FILES:
                single, index = folder / name, folder / f"{name}.index.json"
                files = [single] if single.is_file() else [index, *_shards(index)] if index.is_file() else []
                for f in files:
                    out[str(f.relative_to(self.path))] = sha256_file(f)
                if files:
                    break
        return out


def _shards(index: Path) -> list[Path]:
    """The shard files a `*.index.json` maps the weights to, in name order."""
    names = sorted(set((_read_json(index).get("weight_map") or {}).values()))
    shards = [index.parent / n for n in names]
    missing = [n for n, f in zip(names, shards) if not f.is_file()]
    if missing:
        raise ValueError(f"{index} names shard files that are not there: {', '.join(missing)}")
    return shards


def config_value(config: dict, key: str):
    """config[key], or its spelling under an architecture-specific alias; None when absent."""
    for name in (key, *CONFIG_ALIASES.get(key, ())):
        if config.get(name) is not None:
            return config[name]
    return None


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def position_limit(config: dict) -> int:
    """Tokens the model's position table covers: max_position_embeddings, less the padding offset of
    RoBERTa-style models (their position ids start after the padding index)."""
    limit = int(config.get("max_position_embeddings", 512))
    if config.get("model_type") in OFFSET_POSITION_TYPES:
        limit -= int(config.get("pad_token_id", 1)) + 1
    return limit


def default_max_length(folder: Path, config: dict, processor_kwargs: dict | None = None,
                       max_seq_length: int | None = None) -> int | None:
    """The tokenizer's model_max_length as sentence-transformers 6's Transformer module sets it: the
    processor_kwargs' `model_max_length`, else `max_seq_length`, else tokenizer_config.json's
    model_max_length capped at config.json's max_position_embeddings. None when nothing bounds it."""
    kwargs = processor_kwargs or {}
    if "model_max_length" in kwargs:
        return int(kwargs["model_max_length"])
    if max_seq_length is not None:
        return int(max_seq_length)
    tok_cfg = folder / "tokenizer_config.json"
    mml = _read_json(tok_cfg).get("model_max_length") if tok_cfg.is_file() else None
    limit = mml if isinstance(mml, (int, float)) and 0 < mml < 1e12 else None  # transformers' "no limit" is 1e30
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and positions != -1:
        limit = positions if limit is None else min(limit, positions)
    return None if limit is None else int(limit)


def _st_config(folder: Path) -> tuple[Path, dict]:
    """(file, contents) of the Transformer module's config, found as sentence-transformers 6 finds it."""
    for name in ST_CONFIG_NAMES:
        path = folder / name
        cfg = _read_json(path) if path.is_file() else {}
        if cfg:
            return path, cfg
    return folder / ST_CONFIG_NAMES[0], {}


def _processing_max_length(cfg: dict, where: Path) -> int | None:
    """The max_length the Transformer's `processing_kwargs` gives text tokenization: "common" wins over
    "text", as sentence-transformers merges them into the tokenizer call; None when neither sets one."""
    kwargs = cfg.get("processing_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where}: processing_kwargs must be an object")
    found = None
    for key in ("text", "common"):
        part = kwargs.get(key) or {}
        unknown = sorted(set(part) - PROCESSING_KEYS) if isinstance(part, dict) else [repr(part)]
        if unknown:
            raise ValueError(f"{where}: processing_kwargs.{key} {', '.join(unknown)} is not supported "
                             f"(only {', '.join(sorted(PROCESSING_KEYS))})")
        if part.get("max_length") is not None:
            found = int(part["max_length"])
    return found


def _pooling_modes(cfg: dict) -> list[str]:
    """Pooling modes in concatenation order, as sentence-transformers reads them: `pooling_mode` (a name or a
    list, as sentence-transformers >= 6 saves it) wins over the legacy `pooling_mode_*` flags."""
    modes = cfg.get("pooling_mode")
    if modes is None:
        return [mode for key, mode in POOLING_KEYS.items() if cfg.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    return [POOLING_NAMES.get(m, m) for m in modes]


def _check_io_names(module: dict, cfg: dict) -> None:
    """Dense and Normalize must act on the pooled sentence embedding (their default), not another feature."""
    for key in ("module_input_name", "module_output_name"):
        if cfg.get(key, "sentence_embedding") not in (None, "sentence_embedding"):
            raise ValueError(f"{module['type']} module {module.get('path')!r}: {key}={cfg[key]!r} is not supported")


def read_source(path: str | Path) -> Source:
    """Describe the model in `path`; raise ValueError naming what is missing or unsupported."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"model folder not found: {root} (only local folders are supported)")
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        config_file = root / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{root} has neither modules.json (sentence-transformers) nor config.json (transformers)")
        config = _read_json(config_file)
        return Source(root, "transformers", root, config, ["mean"], False,
                      max_length=default_max_length(root, config))

    transformer_path: Path | None = None
    pooling: list[str] | None = None
    include_prompt = True
    normalize = False
    dense: list[DenseSpec] = []
    modules = _read_json(modules_file)
    order = ", ".join(m["type"].rsplit(".", 1)[-1] for m in modules)
    for module in modules:
        kind = module["type"].rsplit(".", 1)[-1]
        if normalize and kind != "Normalize":
            # the graph normalizes last, after every Dense layer: another order would be another model
            raise ValueError(f"{modules_file}: a {kind} module follows Normalize (order: {order}); only Normalize "
                             f"as the last module is supported")
        folder = (root / module.get("path", "")).resolve()
        if root not in (folder, *folder.parents):
            raise ValueError(f"modules.json points outside the model folder: {module.get('path')!r}")
        if kind == "Transformer":
            transformer_path = folder
        elif kind == "Pooling":
            cfg = _read_json(folder / "config.json")
            pooling = _pooling_modes(cfg)
            include_prompt = cfg.get("include_prompt", True) is not False
        elif kind == "Normalize":
            cfg_file = folder / "config.json"
            _check_io_names(module, _read_json(cfg_file) if module.get("path") and cfg_file.is_file() else {})
            normalize = True
        elif kind == "Dense":
            cfg = _read_json(folder / "config.json")
            _check_io_names(module, cfg)
            if cfg.get("use_residual"):
                raise ValueError(f"Dense module {module.get('path')!r}: use_residual=true is not supported")
            act = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
            if act not in ACTIVATIONS:
                raise ValueError(f"Dense module {module.get('path')!r}: activation {act} is not supported")
            dense.append(DenseSpec(folder, int(cfg["in_features"]), int(cfg["out_features"]),
                                   bool(cfg.get("bias", True)), ACTIVATIONS[act]))
        else:
            raise ValueError(f"sentence-transformers module {module['type']} is not supported")
    if transformer_path is None:
        raise ValueError(f"{modules_file} names no Transformer module")
    config = _read_json(transformer_path / "config.json")
    st_cfg_file, st_cfg = _st_config(transformer_path)
    if st_cfg.get("tokenizer_name_or_path") is not None:
        raise ValueError(f"{st_cfg_file}: tokenizer_name_or_path={st_cfg['tokenizer_name_or_path']!r} is not "
                         f"supported (the tokenizer must be the Transformer folder's own)")
    # sentence-transformers renames the legacy tokenizer_args to processor_kwargs, replacing any given
    tok_kwargs = st_cfg["tokenizer_args"] if "tokenizer_args" in st_cfg else st_cfg.get("processor_kwargs")
    tok_kwargs = tok_kwargs or {}
    if not isinstance(tok_kwargs, dict):
        raise ValueError(f"{st_cfg_file}: processor_kwargs / tokenizer_args must be an object")
    max_length = _processing_max_length(st_cfg, st_cfg_file) or default_max_length(
        transformer_path, config, tok_kwargs, st_cfg.get("max_seq_length"))
    prompts, default_prompt = _prompts(root)
    return Source(root, "sentence-transformers", transformer_path, config, pooling or ["mean"], normalize, dense,
                  max_length, bool(st_cfg.get("do_lower_case", False)),
                  prompts=prompts, default_prompt_name=default_prompt, include_prompt=include_prompt,
                  tokenizer_kwargs=dict(tok_kwargs), truncate_dim=_st_model_config(root).get("truncate_dim"))


def _st_model_config(root: Path) -> dict:
    cfg_file = root / "config_sentence_transformers.json"
    return _read_json(cfg_file) if cfg_file.is_file() else {}


def _prompts(root: Path) -> tuple[dict[str, str], str | None]:
    """`prompts` and `default_prompt_name` from config_sentence_transformers.json, checked as
    sentence-transformers checks them when it loads the model."""
    cfg_file = root / "config_sentence_transformers.json"
    cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
    prompts = cfg.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise ValueError(f"{cfg_file}: `prompts` must map names to prompt strings")
    default = cfg.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ValueError(f"{cfg_file}: default_prompt_name {default!r} is not one of the prompts "
                         f"({', '.join(map(repr, prompts)) or 'none'})")
    return dict(prompts), default
