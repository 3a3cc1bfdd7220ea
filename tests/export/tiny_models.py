"""Tiny random-weight models of several architectures, built locally (no hub access).

Each model is built from a config (hidden 32, 2 layers, 4 heads, about 128 positions) with seeded
random weights, plus a real fast tokenizer whose vocabulary is trained here with the `tokenizers`
library on the repository's own texts, then handed to the architecture's transformers tokenizer class
and saved with `save_pretrained` (so the folder is exactly what `AutoTokenizer` loads, tokenizer.json
included).

`build_transformers_folder` writes a plain transformers folder; `build_st_folder` wraps one in a
sentence-transformers layout (modules.json, sentence_bert_config.json, 1_Pooling, optional 2_Dense
and Normalize), written by hand in the format published checkpoints use.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]

HIDDEN = 32
LAYERS = 2
HEADS = 4
INTERMEDIATE = 64
POSITIONS = 128  # usable positions; models with offset position ids get 2 more in their config
VOCAB_SIZE = 600


@dataclass(frozen=True)
class Arch:
    name: str  # our key
    model_type: str
    tokenizer: str  # "wordpiece" | "bpe" | "unigram" | "bpe-template" (special tokens added by a template)
    uses_token_types: bool  # whether the export must take token_type_ids
    pooling: tuple[str, ...] = ("mean",)  # the head its family is published with (ARCH_CASES)
    dense: tuple[tuple, ...] = ()
    remote_code: bool = False  # the modeling code ships in the folder (auto_map): needs trust_remote_code


ARCHS = {
    "bert": Arch("bert", "bert", "wordpiece", True),
    "roberta": Arch("roberta", "roberta", "bpe", False),
    "xlm-roberta": Arch("xlm-roberta", "xlm-roberta", "unigram", False),
    "mpnet": Arch("mpnet", "mpnet", "wordpiece", False),
    "distilbert": Arch("distilbert", "distilbert", "wordpiece", False),
    "electra": Arch("electra", "electra", "wordpiece", True),
    # decoder embedders (Qwen3-Embedding style): last-token pooling on the end-of-text token the tokenizer appends
    "qwen3": Arch("qwen3", "qwen3", "bpe-template", False, ("lasttoken",)),
    "qwen2": Arch("qwen2", "qwen2", "bpe-template", False, ("lasttoken",)),
    # bidirectional Gemma3 (EmbeddingGemma style): mean pooling, two Dense layers (no bias, identity)
    "gemma3": Arch("gemma3", "gemma3_text", "bpe-template", False, ("mean",),
                   ((64, "Identity", False), (32, "Identity", False))),
    "modernbert": Arch("modernbert", "modernbert", "bpe-template", False),
    # custom-code encoder (as NomicBERT, GTE "new", Jina v2 ship theirs): the classes below, in the folder
    "custom": Arch("custom", "tiny-custom-encoder", "wordpiece", False, remote_code=True),
}
# Sliding window of the tiny Gemma3 / ModernBERT models: far below the texts' lengths, so the local layers'
# masks cut real tokens.
WINDOW = 8

# Special tokens, in the id order the published checkpoints use.
_SPECIALS = {
    "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "distilbert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "electra": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "custom": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "mpnet": ["<s>", "<pad>", "</s>", "<unk>", "[UNK]", "<mask>"],
    "roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    "xlm-roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    "qwen3": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "gemma3": ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"],
    # ModernBERT's own ids: pad, cls and sep are none of 0, 1, 2 (as in the published checkpoints' order)
    "modernbert": ["<|endoftext|>", "<|padding|>", "[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"],
}
# bpe-template tokenizers: the post-processor's template and the tokenizer's named special tokens.
_TEMPLATES = {
    "qwen3": ("$A <|endoftext|>", dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>", padding_side="left")),
    "qwen2": ("$A <|endoftext|>", dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>", padding_side="left")),
    "gemma3": ("<bos> $A <eos>", dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                      mask_token="<mask>")),
    "modernbert": ("[CLS] $A [SEP]", dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
                                         mask_token="[MASK]")),
}
# Qwen's NFC normalizer and pre-tokenizer split (as its published tokenizer.json has them), so that transformers' Qwen2Tokenizer,
# which rebuilds the split from its own pattern, tokenizes exactly as the tokenizer.json we export.
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def corpus() -> list[str]:
    """Real text to train the vocabularies on: the bundled sample and the benchmark texts."""
    lines = (REPO / "stableembed" / "data" / "sample.txt").read_text(encoding="utf-8").splitlines()
    for name in ("short.txt", "long.txt"):
        lines += (REPO / "benchmarks" / "data" / name).read_text(encoding="utf-8").splitlines()[:1500]
    return [line for line in lines if line.strip()]


def _train_tokenizer(arch: Arch):
    """A transformers fast tokenizer of the architecture's own class, over a vocabulary trained here."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    texts = corpus()
    specials = _SPECIALS[arch.name]
    if arch.tokenizer == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials))
        vocab = tok.get_vocab()
        cls = {"bert": transformers.BertTokenizer, "distilbert": transformers.DistilBertTokenizer,
               "electra": transformers.ElectraTokenizer, "mpnet": transformers.MPNetTokenizer,
               "custom": transformers.BertTokenizer}[arch.name]
        kwargs = {"unk_token": "[UNK]"} if arch.name == "mpnet" else {}
        return cls(vocab=vocab, do_lower_case=True, model_max_length=POSITIONS, **kwargs)
    if arch.tokenizer == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        data = json.loads(tok.to_str())["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["merges"]]
        return transformers.RobertaTokenizer(vocab=data["vocab"], merges=merges, model_max_length=POSITIONS)
    if arch.tokenizer == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(texts, trainers.UnigramTrainer(
            vocab_size=VOCAB_SIZE, special_tokens=specials, unk_token="<unk>"))
        vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
        return transformers.XLMRobertaTokenizer(vocab=vocab, model_max_length=POSITIONS)
    if arch.tokenizer == "bpe-template":
        from tokenizers import Regex, processors

        tok = Tokenizer(models.BPE())
        if arch.name.startswith("qwen"):
            tok.normalizer = normalizers.NFC()
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        template, named = _TEMPLATES[arch.name]
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, tok.token_to_id(t)) for t in specials if t in template.split()])
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=POSITIONS, **named)
    raise ValueError(arch.tokenizer)


def _config(arch: Arch, tokenizer):
    import transformers

    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=INTERMEDIATE, pad_token_id=tokenizer.pad_token_id)
    if arch.name == "bert":
        return transformers.BertConfig(max_position_embeddings=POSITIONS, type_vocab_size=2, **common)
    if arch.name == "electra":
        return transformers.ElectraConfig(max_position_embeddings=POSITIONS, type_vocab_size=2,
                                          embedding_size=HIDDEN, **common)
    if arch.name == "roberta":
        return transformers.RobertaConfig(max_position_embeddings=POSITIONS + 2, type_vocab_size=1,
                                          bos_token_id=0, eos_token_id=2, **common)
    if arch.name == "xlm-roberta":
        return transformers.XLMRobertaConfig(max_position_embeddings=POSITIONS + 2, type_vocab_size=1,
                                             bos_token_id=0, eos_token_id=2, **common)
    if arch.name == "mpnet":
        return transformers.MPNetConfig(max_position_embeddings=POSITIONS + 2, bos_token_id=0, eos_token_id=2,
                                        **common)
    if arch.name == "distilbert":
        return transformers.DistilBertConfig(vocab_size=vocab, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
                                             hidden_dim=INTERMEDIATE, max_position_embeddings=POSITIONS,
                                             pad_token_id=tokenizer.pad_token_id)
    small = dict(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS)
    if arch.name in ("qwen3", "qwen2"):
        cls = transformers.Qwen3Config if arch.name == "qwen3" else transformers.Qwen2Config
        eos = tokenizer.eos_token_id
        return cls(num_key_value_heads=2, pad_token_id=eos, eos_token_id=eos, bos_token_id=eos,
                   tie_word_embeddings=True, **small)
    if arch.name == "gemma3":
        # 3 layers: two sliding-window layers, then a global one
        return transformers.Gemma3TextConfig(
            **{**small, "num_hidden_layers": 3}, num_key_value_heads=2, head_dim=HIDDEN // HEADS,
            sliding_window=WINDOW, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            use_bidirectional_attention=True, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if arch.name == "modernbert":
        # 3 layers: global, local (sliding window), global
        return transformers.ModernBertConfig(
            **{**small, "num_hidden_layers": 3}, local_attention=WINDOW, global_attn_every_n_layers=2,
            pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id)
    raise ValueError(arch.name)


CUSTOM_CONFIG = '''
from transformers import PretrainedConfig


class TinyCustomConfig(PretrainedConfig):
    model_type = "tiny-custom-encoder"

    def __init__(self, vocab_size=600, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=128, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        super().__init__(**kwargs)
'''

CUSTOM_MODEL = '''
import math

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from .configuration_tiny_custom import TinyCustomConfig


class Block(torch.nn.Module):
    """Post-norm self-attention and a SiLU feed-forward, written out by hand."""

    def __init__(self, h, heads):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(h, 3 * h)
        self.out = torch.nn.Linear(h, h)
        self.norm1 = torch.nn.LayerNorm(h)
        self.up = torch.nn.Linear(h, 2 * h)
        self.down = torch.nn.Linear(2 * h, h)
        self.norm2 = torch.nn.LayerNorm(h)

    def forward(self, x, bias):
        b, t, h = x.shape
        q, k, v = (z.reshape(b, t, self.heads, h // self.heads).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(h // self.heads) + bias, dim=-1)
        x = self.norm1(x + self.out((att @ v).transpose(1, 2).reshape(b, t, h)))
        return self.norm2(x + self.down(torch.nn.functional.silu(self.up(x))))


class TinyCustomModel(PreTrainedModel):
    config_class = TinyCustomConfig
    base_model_prefix = "tiny"

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos = torch.nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.blocks = torch.nn.ModuleList(Block(config.hidden_size, config.num_attention_heads)
                                          for _ in range(config.num_hidden_layers))
        self.post_init()

    def forward(self, input_ids, attention_mask=None, return_dict=True, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.pos(positions)[None]
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for block in self.blocks:
            x = block(x, bias)
        return BaseModelOutput(last_hidden_state=x)
'''


def _custom_config(folder: Path, tokenizer):
    """Write the custom code and a config.json mapping to it; the config object, loaded through it."""
    import transformers

    (folder / "configuration_tiny_custom.py").write_text(CUSTOM_CONFIG, encoding="utf-8")
    (folder / "modeling_tiny_custom.py").write_text(CUSTOM_MODEL, encoding="utf-8")
    config = {"model_type": "tiny-custom-encoder", "architectures": ["TinyCustomModel"],
              "auto_map": {"AutoConfig": "configuration_tiny_custom.TinyCustomConfig",
                           "AutoModel": "modeling_tiny_custom.TinyCustomModel"},
              "vocab_size": len(tokenizer), "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "max_position_embeddings": POSITIONS,
              "pad_token_id": tokenizer.pad_token_id}
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)


def build_transformers_folder(arch_name: str, folder: Path, seed: int = 0) -> Path:
    """A plain transformers model folder (config.json, model.safetensors, tokenizer files; for a custom-code
    architecture also its configuration and modeling files, named in config.json's auto_map)."""
    import torch
    import transformers

    arch = ARCHS[arch_name]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(arch)
    config = _custom_config(folder, tokenizer) if arch.remote_code else _config(arch, tokenizer)
    torch.manual_seed(seed)
    model = transformers.AutoModel.from_config(config, trust_remote_code=arch.remote_code).eval()
    # Random init makes LayerNorm weights exactly 1 and biases 0; perturb every parameter so no
    # structure hides a wrong graph.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if not (folder / "tokenizer.json").is_file():
        raise RuntimeError(f"{arch_name}: save_pretrained wrote no tokenizer.json")
    return folder


def pooling_config(modes: Sequence[str], dim: int = HIDDEN) -> dict:
    """1_Pooling/config.json in the (legacy, boolean-flag) format published checkpoints use."""
    keys = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
            "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
            "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}
    cfg: dict = {"word_embedding_dimension": dim}
    unknown = set(modes) - set(keys)
    if unknown:
        raise ValueError(f"unknown pooling modes {sorted(unknown)}")
    cfg.update({key: mode in modes for mode, key in keys.items()})
    cfg["include_prompt"] = True
    return cfg


def build_st_folder(
    transformer_folder: Path,
    folder: Path,
    pooling: Sequence[str] | dict = ("mean",),
    dense: Sequence[tuple[int, str]] = (),
    normalize: bool = False,
    max_seq_length: int | None = None,
    seed: int = 0,
    module_types: dict[str, str] | None = None,
) -> Path:
    """A sentence-transformers folder: the transformer files at the root (as published models have them),
    modules.json, sentence_bert_config.json, 1_Pooling, then one `2_Dense`, `3_Dense`... per
    (out_features, activation[, bias]) in `dense` (activation: a torch.nn class path suffix such as "Tanh"),
    then Normalize.

    `pooling` is a list of modes (legacy flag format) or a ready config dict.
    """
    import numpy as np
    from safetensors.numpy import save_file

    transformer_folder, folder = Path(transformer_folder), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for f in transformer_folder.iterdir():
        if f.is_file():
            shutil.copyfile(f, folder / f.name)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    hidden = int(config.get("hidden_size") or config.get("dim"))
    types = {"Transformer": "sentence_transformers.models.Transformer",
             "Pooling": "sentence_transformers.models.Pooling",
             "Dense": "sentence_transformers.models.Dense",
             "Normalize": "sentence_transformers.models.Normalize", **(module_types or {})}

    modules = [{"idx": 0, "name": "0", "path": "", "type": types["Transformer"]}]
    st_cfg = {"max_seq_length": max_seq_length or POSITIONS, "do_lower_case": False}
    (folder / "sentence_bert_config.json").write_text(json.dumps(st_cfg, indent=2), encoding="utf-8")

    if isinstance(pooling, dict):
        pool_cfg = dict(pooling)
        n_modes = len(pool_cfg["pooling_mode"]) if isinstance(pool_cfg.get("pooling_mode"), list) else 1
    else:
        pool_cfg = pooling_config(pooling, hidden)
        n_modes = len(pooling)
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg, indent=2), encoding="utf-8")
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": types["Pooling"]})

    rng = np.random.default_rng(seed)
    width = hidden * n_modes
    for out_features, activation, *opt in dense:
        bias = opt[0] if opt else True
        idx = len(modules)
        path = f"{idx}_Dense"
        (folder / path).mkdir(exist_ok=True)
        module_path = {"Identity": "torch.nn.modules.linear.Identity"}.get(
            activation, f"torch.nn.modules.activation.{activation}")
        (folder / path / "config.json").write_text(json.dumps(
            {"in_features": width, "out_features": out_features, "bias": bias,
             "activation_function": module_path}, indent=2), encoding="utf-8")
        bound = 1 / np.sqrt(width)
        tensors = {"linear.weight": rng.uniform(-bound, bound, (out_features, width)).astype(np.float32)}
        if bias:
            tensors["linear.bias"] = rng.uniform(-bound, bound, (out_features,)).astype(np.float32)
        save_file(tensors, str(folder / path / "model.safetensors"))
        modules.append({"idx": idx, "name": str(idx), "path": path, "type": types["Dense"]})
        width = out_features
    if normalize:
        idx = len(modules)
        modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_Normalize", "type": types["Normalize"]})
    (folder / "modules.json").write_text(json.dumps(modules, indent=2), encoding="utf-8")
    return folder


def build_st_saved_folder(transformer_folder: Path, folder: Path, pooling: Sequence[str],
                          dense: Sequence[tuple[int, str]] = (), normalize: bool = False, seed: int = 0) -> Path:
    """The same kind of model assembled from sentence-transformers' own modules and written with its own
    `save` (the current format: new module paths, `pooling_mode` list, config files for every module)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    transformer = Transformer(str(transformer_folder), max_seq_length=POSITIONS)
    hidden = transformer.get_embedding_dimension()
    modules = [transformer, Pooling(hidden, pooling_mode=tuple(pooling))]
    width = hidden * len(pooling)
    torch.manual_seed(seed)
    for out_features, activation in dense:
        act = torch.nn.Identity() if activation == "Identity" else getattr(torch.nn, activation)()
        modules.append(Dense(width, out_features, activation_function=act))
        width = out_features
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    return Path(folder)


@dataclass(frozen=True)
class Case:
    """One model folder to export: an architecture and a sentence-transformers head (or none)."""

    id: str
    arch: str = "bert"
    layout: str = "st"  # "st" (hand-written, published format) | "st-saved" (ST's own save) | "plain"
    pooling: tuple[str, ...] = ("mean",)  # sentence-transformers' mode names, in concatenation order
    pooling_format: str = "flags"  # 1_Pooling/config.json as "flags" (pooling_mode_* booleans) or "mode"
    dense: tuple[tuple, ...] = ()  # (out_features, activation[, bias])
    normalize: bool = False
    exporter: str | None = None  # None: the family's own (export/families.py)

    @property
    def source_key(self) -> tuple:
        return (self.arch, self.layout, self.pooling, self.pooling_format, self.dense, self.normalize)


class TinyZoo:
    """Builds each model folder once and exports each (folder, exporter) once, under `root`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._transformers: dict[str, Path] = {}
        self._sources: dict[tuple, Path] = {}
        self._artifacts: dict[tuple, tuple[Path, float]] = {}

    def transformers(self, arch: str) -> Path:
        if arch not in self._transformers:
            self._transformers[arch] = build_transformers_folder(arch, self.root / "hf" / arch)
        return self._transformers[arch]

    def source(self, case: Case) -> Path:
        key = case.source_key
        if key not in self._sources:
            hf = self.transformers(case.arch)
            folder = self.root / "src" / f"{case.id}-{len(self._sources)}"
            if case.layout == "plain":
                self._sources[key] = hf
            elif case.layout == "st-saved":
                self._sources[key] = build_st_saved_folder(hf, folder, case.pooling, case.dense, case.normalize)
            else:
                pooling: Sequence[str] | dict = case.pooling
                if case.pooling_format == "mode":  # the key sentence-transformers >= 6 writes
                    modes = list(case.pooling)
                    pooling = {"embedding_dimension": HIDDEN, "pooling_mode": modes[0] if len(modes) == 1 else modes,
                               "include_prompt": True}
                self._sources[key] = build_st_folder(hf, folder, pooling, case.dense, case.normalize)
        return self._sources[key]

    def artifact(self, case: Case) -> tuple[Path, float]:
        """(artifact folder, seconds the export took)."""
        import time

        from stableembed import export_model

        key = (case.source_key, case.exporter)
        if key not in self._artifacts:
            src = self.source(case)
            out = self.root / "art" / f"{case.id}-{len(self._artifacts)}"
            start = time.perf_counter()
            export_model(src, out, parity=True, exporter=case.exporter,
                         trust_remote_code=ARCHS[case.arch].remote_code)
            self._artifacts[key] = (out, time.perf_counter() - start)
        return self._artifacts[key]
