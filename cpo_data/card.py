"""What Hugging Face sees of a version: its dataset card, and the conversational view.

The card is a `README.md`: YAML front matter that `datasets` and the Hub read (one config per
language pair plus `default` over all of them, the features, licence, languages), then prose
drawn from the manifest (counts, systems, provenance, what was dropped, how to load). In the
store a version keeps it as `__attachments__/README.md` and its front matter alone as
`.huggingface.yaml` (a root `README.md` would be read as Parquet by `pd.read_parquet`); an
export or push puts it at the root as `README.md`. It is a pure function of the manifest, so a
version published before cards existed gets one when it is exported or pushed
(`store.export_version`).

The conversational view is TRL's conversational preference format: `prompt` becomes
`[{"role": "user", "content": prompt}]`, `chosen` and `rejected` become one assistant message
each; every other column stays as it is. Plain functions; the store does the file I/O.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import yaml

from cpo_data import schema

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)
ROLES = {"prompt": "user", "chosen": "assistant", "rejected": "assistant"}
CONVERSATIONAL = pa.schema([f.with_type(MESSAGES) if f.name in ROLES else f
                            for f in schema.TRIPLETS])
"""The triplets schema with `prompt`, `chosen` and `rejected` as message lists."""

DEFAULT_CONFIG = "default"
CONVERSATIONAL_CONFIG = "conversational"
# The card's own files, as a manifest lists them (`store.CARD_PATH`, `store.REPO_YAML`; the
# root `README.md` of an earlier layout): not attachments in the card's file list.
_CARD_FILES = ("__attachments__/README.md", ".huggingface.yaml", "README.md")
_SIZES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
          (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")]


def conversational(table: pa.Table) -> pa.Table:
    """A triplets table in TRL's conversational preference format (see the module docstring)."""
    table = schema.validate(table, schema.TRIPLETS, what="triplets")
    offsets = pa.array(range(table.num_rows + 1), pa.int32())
    for name, role in ROLES.items():
        texts = table.column(name).combine_chunks()
        roles = pa.array([role] * table.num_rows, pa.string())
        messages = pa.ListArray.from_arrays(
            offsets, pa.StructArray.from_arrays([roles, texts], fields=list(MESSAGE)))
        index = table.schema.get_field_index(name)
        table = table.set_column(index, CONVERSATIONAL.field(name), messages)
    return schema.validate(table, CONVERSATIONAL, what="conversational triplets")


# ---- front matter -------------------------------------------------------------------------------


def _dtype_yaml(name: str, type_: pa.DataType) -> dict[str, Any]:
    """One feature as `datasets` writes it in a card (`Features._to_yaml_list`'s layout)."""
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        inner = type_.value_type
        if pa.types.is_struct(inner):
            return {"name": name, "list": [_dtype_yaml(f.name, f.type) for f in inner]}
        return {"name": name, "list": _dtype_yaml("", inner)["dtype"]}
    if pa.types.is_struct(type_):
        return {"name": name, "struct": [_dtype_yaml(f.name, f.type) for f in type_]}
    # Arrow calls float64 "double"; `datasets` names it as numpy does.
    names = {pa.bool_(): "bool", pa.float16(): "float16", pa.float32(): "float32",
             pa.float64(): "float64"}
    return {"name": name, "dtype": names.get(type_, str(type_))}  # string, int32, ...


def features_yaml(table_schema: pa.Schema) -> list[dict[str, Any]]:
    """The `features` list of a card's `dataset_info` for an Arrow schema."""
    return [_dtype_yaml(f.name, f.type) for f in table_schema]


def _paths_by_pair(entries: list[dict]) -> dict[str, list[str]]:
    by_pair: dict[str, list[str]] = {}
    for entry in entries:
        # `de-en/part-00000.parquet`, or `__conversational__/de-en/part-00000.parquet`.
        by_pair.setdefault(entry["path"].split("/")[-2], []).append(entry["path"])
    return dict(sorted(by_pair.items()))


def _config(name: str, paths: list[str]) -> dict[str, Any]:
    return {"config_name": name, "data_files": [{"split": "train", "path": paths}]}


def front_matter(manifest: dict) -> dict[str, Any]:
    """The card's YAML metadata: configs, features (current schema only), licence, languages."""
    pairs = _paths_by_pair(manifest.get("files", []))
    rows = manifest.get("rows_per_lang_pair", {})
    configs = [_config(DEFAULT_CONFIG, [p for paths in pairs.values() for p in paths])]
    configs += [_config(pair, paths) for pair, paths in pairs.items()]
    chat = manifest.get("conversational_files") or []
    if chat:
        configs.append(_config(CONVERSATIONAL_CONFIG, [e["path"] for e in chat]))
    meta: dict[str, Any] = {"pretty_name": f"{manifest.get('name', 'triplets')} "
                                           f"({manifest.get('version', '?')})"}
    if manifest.get("license"):
        meta["license"] = manifest["license"]
    meta["language"] = sorted({code for pair in pairs for code in pair.split("-")})
    meta["task_categories"] = ["translation", "text-generation"]
    meta["tags"] = ["preference", "machine-translation", "cpo", "dpo", "orpo", "cpo-data"]
    total = manifest.get("rows", sum(rows.values()))
    meta["size_categories"] = [next((label for limit, label in _SIZES if total < limit),
                                    "n>100M")]
    meta["configs"] = configs
    # Older schema versions' files lack columns the current features name: let `datasets`
    # read their types from the files instead of refusing them.
    if manifest.get("schema_version") == schema.SCHEMA_VERSION:
        # A fresh list per config: a shared one would be written as a YAML alias.
        info = [{"config_name": DEFAULT_CONFIG, "features": features_yaml(schema.TRIPLETS),
                 "splits": [{"name": "train", "num_examples": total}]}]
        info += [{"config_name": pair, "features": features_yaml(schema.TRIPLETS),
                  "splits": [{"name": "train", "num_examples": rows.get(pair, 0)}]}
                 for pair in pairs]
        if chat:
            info.append({"config_name": CONVERSATIONAL_CONFIG,
                         "features": features_yaml(CONVERSATIONAL),
                         "splits": [{"name": "train", "num_examples": total}]})
        meta["dataset_info"] = info
    return meta


# ---- prose --------------------------------------------------------------------------------------


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_plain(v)}" for k, v in value.items()) or "none"
    if isinstance(value, list | tuple):
        return ", ".join(_plain(v) for v in value) or "none"
    return "none" if value is None else str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    def line(cells: list[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(headers), line(["---"] * len(headers)), *map(line, rows), ""]


def _provenance(provenance: dict) -> list[str]:
    named = [("cpo-data version", "cpo_data_version"), ("source fingerprint", "source_fingerprint"),
             ("ranked by", "rank_by"), ("generators", "generators"), ("scorers", "scorers"),
             ("margin floor (min_margin)", "min_margin"), ("noise thresholds", "noise_thresholds"),
             ("guard vetoes", "vetoes")]
    lines = [f"- {label}: {_plain(provenance[key])}" for label, key in named if key in provenance]
    if not lines:
        return ["The manifest records no build provenance for this version.", ""]
    return ["The build that made this version, as its manifest records it:", "", *lines, ""]


def _loading(manifest: dict, pairs: list[str]) -> list[str]:
    pair = pairs[0] if pairs else "de-en"
    where = "REPO_ID_OR_FOLDER"
    code = ["```python", "from datasets import load_dataset", "",
            f'train = load_dataset("{where}", split="train")            # every language pair',
            f'train = load_dataset("{where}", "{pair}", split="train")   # one language pair']
    if manifest.get("conversational_files"):
        code.append(f'chat = load_dataset("{where}", "conversational", split="train")  '
                    "# message lists")
    code += ["", "import pandas as pd", "",
             f'df = pd.read_parquet("{pair}/part-00000.parquet")  # one pair, from these files',
             "", "import cpo_data", "",
             f'df = cpo_data.read_triplets("STORE/{manifest.get("name", "NAME")}", '
             f'version="{manifest.get("version", "VERSION")}", verify=True)',
             "```", ""]
    return ["## Loading", "", *code,
            "`cpo_data.read_triplets(..., format=\"conversational\")` gives the message-list "
            "form of any version, for chat models.", ""]


def _files(manifest: dict) -> list[str]:
    rows = [[f"`{e['path']}`", "triplets", e.get("rows", "")] for e in manifest.get("files", [])]
    rows += [[f"`{e['path']}`", "triplets, conversational", e.get("rows", "")]
             for e in manifest.get("conversational_files") or []]
    rows += [[f"`{e['path']}`", "dropped rows with reasons (in no config)", e.get("rows", "")]
             for e in manifest.get("dropped_files", [])]
    rows += [[f"`{e['path']}`", "attachment", ""] for e in manifest.get("attachments") or []
             if e["path"] not in _CARD_FILES]
    return ["## Files", "", *_table(["path", "holds", "rows"], rows),
            "This card is `README.md` at the root of an exported or pushed version; in the "
            "cpo-data store it is `__attachments__/README.md`, with its front matter alone in "
            "`.huggingface.yaml`. `.manifest.json` lists every file with its size and sha256 "
            "(`_manifest.json` in versions published before dataset cards).", ""]


def render_card(manifest: dict) -> str:
    """The card (`README.md`) of a version: YAML front matter, then prose from the manifest.
    Keys an older or partial manifest lacks are left out of the prose, never guessed."""
    meta = front_matter(manifest)
    rows = manifest.get("rows_per_lang_pair", {})
    pairs = list(_paths_by_pair(manifest.get("files", [])))
    name, version = manifest.get("name", "triplets"), manifest.get("version", "?")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---",
             "", f"# {name}, version {version}", "",
             "Machine-translation preference data: each row holds a source segment, the prompt "
             "that asks for its translation, a preferred translation (`chosen`) and a "
             "dispreferred one (`rejected`), with the scores that ranked them. It feeds "
             "preference training (CPO, ORPO, DPO) as it is. Built and published with cpo-data"
             f"{'' if 'created_at' not in manifest else ' on ' + manifest['created_at'][:10]}"
             f", schema version {manifest.get('schema_version', '?')}.", "",
             "## Contents", "",
             *_table(["language pair (config)", "triplets"],
                     [[f"`{p}`", rows.get(p, "?")] for p in pairs]
                     + [["all (`default`)", manifest.get("rows", sum(rows.values()))]])]
    systems = manifest.get("systems") or manifest.get("provenance", {}).get("systems")
    if systems:
        lines += ["How often each system's translation was chosen and rejected:", "",
                  *_table(["system", "chosen", "rejected"],
                          [[s.get("system"), s.get("chosen", 0), s.get("rejected", 0)]
                           for s in systems])]
    if manifest.get("conversational_files"):
        lines += ["The `conversational` config holds the same rows in TRL's conversational "
                  "format: `prompt` is one user message, `chosen` and `rejected` one assistant "
                  "message each.", ""]
    lines += ["## Provenance", "", *_provenance(manifest.get("provenance") or {})]
    dropped = manifest.get("dropped_per_reason") or {}
    lines += ["## What was left out", ""]
    lines += (_table(["reason", "rows"], [[f"`{r}`", n] for r, n in dropped.items()])
              if dropped else ["Nothing was dropped." if "dropped_per_reason" in manifest
                               else "This version's manifest does not record drops.", ""])
    licence = manifest.get("license")
    lines += ["## Licence", "",
              f"Published under `{licence}`, as the build's `publish.license` says. The "
              "licences of the source texts and of the systems that translated them still "
              "apply." if licence else
              "Unknown: the build set no licence. Set `publish.license` (a Hub licence id "
              "such as `cc-by-nc-sa-4.0`) in the build's config, and check the licences of "
              "the source texts and systems before sharing.", ""]
    lines += _loading(manifest, pairs) + _files(manifest)
    return "\n".join(lines)
