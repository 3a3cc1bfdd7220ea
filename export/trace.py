"""Trace the transformer (token embeddings only) to ONNX with torch."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

from .._extras import require

EXPORTERS = ("torchscript", "dynamo")


def check_local_code(folder: Path, config: dict) -> None:
    """Remote code may only come from Python files inside `folder`: an auto_map entry naming another
    repository ("owner/repo--module.Class") or a module file that is not in the folder is refused."""
    for key, ref in (config.get("auto_map") or {}).items():
        for item in ref if isinstance(ref, (list, tuple)) else [ref]:
            if item is None:
                continue
            if "--" in item:
                raise ValueError(f"{folder / 'config.json'}: auto_map {key} = {item!r} points to code in another "
                                 f"repository; only code inside the model folder is loaded")
            module = item.rsplit(".", 1)[0]
            file = (folder / (module.replace(".", "/") + ".py")).resolve()
            if folder.resolve() not in file.parents or not file.is_file():
                raise ValueError(f"{folder / 'config.json'}: auto_map {key} = {item!r} needs {file.name}, which is "
                                 f"not in the model folder")


def load_transformer(folder: Path, trust_remote_code: bool = False):
    """The Hugging Face model in eval mode, fp32, with the plain (eager) attention that exports to standard ops.

    With `trust_remote_code`, a model whose config maps AutoModel to its own modeling code runs that code,
    read from `folder` only (never fetched from a hub)."""
    require("torch", "export")
    transformers = require("transformers", "export")
    if trust_remote_code:
        import json

        check_local_code(folder, json.loads((folder / "config.json").read_text(encoding="utf-8")))
    model = transformers.AutoModel.from_pretrained(str(folder), attn_implementation="eager",
                                                   trust_remote_code=trust_remote_code, local_files_only=True)
    return model.float().eval()


def uses_token_type_ids(model) -> bool:
    """True when the model takes token_type_ids and has more than one type embedding."""
    params = inspect.signature(model.forward).parameters
    return "token_type_ids" in params and int(getattr(model.config, "type_vocab_size", 0) or 0) > 1


def trace_transformer(model, out: Path, input_names: list[str], opset: int, exporter: str) -> int:
    """Write an ONNX graph mapping `input_names` to `token_embeddings` [batch, seq, hidden]; returns the
    graph's opset, which the dynamo exporter may leave above `opset` when it cannot convert the graph down
    (Gemma3: opset 18)."""
    torch = require("torch", "export")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            kwargs = dict(zip(input_names, args))
            return self.inner(**kwargs, return_dict=True).last_hidden_state

    # Two rows of different real length, so no trace specializes on "no padding".
    vocab = int(model.config.vocab_size)
    ids = torch.tensor([[min(5 + i, vocab - 1) for i in range(8)]] * 2, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    example = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    args = tuple(example[n] for n in input_names)
    kwargs: dict = dict(input_names=input_names, output_names=["token_embeddings"], opset_version=opset)
    if exporter == "dynamo":
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2)
        # forward(*args) is one var-positional parameter: its shapes are one tuple, one entry per input
        kwargs["dynamic_shapes"] = (tuple({0: batch, 1: seq} for _ in input_names),)
    else:
        axes = {0: "batch", 1: "seq"}
        kwargs["dynamic_axes"] = {n: axes for n in [*input_names, "token_embeddings"]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(TokenEmbeddings(model), args, str(out), dynamo=exporter == "dynamo",
                          external_data=False, **kwargs)
    onnx = require("onnx", "export")
    graph = onnx.load(str(out), load_external_data=False)
    return next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
