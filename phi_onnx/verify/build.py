"""`phi-onnx build RECIPE`: many models x variants, exported, verified, laid out like the published ONNX repos.

A recipe is YAML:

```yaml
output: out/phi                 # where the model folders go (relative to the working directory)
verify: true                    # verify every variant against its source (default true)
verification:                   # optional: inputs and limits (see `phi-onnx verify`)
  new_tokens: 32
  text_tokens: 1024
  prompts: prompts.txt          # relative to the recipe file
  text: heldout.txt
  thresholds:
    int4: {top1_agreement: 0.85}
variants: [cpu-int4-rtn-block-32, cuda-fp16]      # default for models that list none
models:
  - name: phi-3-mini-4k-instruct                   # the folder name
    source: phi-3-mini                             # short name, hub id or local folder
    revision: main                                 # optional hub revision
    verify: true                                   # optional, per model (the reference runs in fp32 on CPU)
    variants:
      - cpu-int4-rtn-block-32
      - {variant: cuda-int4-rtn-block-32, max_length: 2048}
```

Each variant lands in `OUTPUT/NAME/cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4/`, `OUTPUT/NAME/cuda/cuda-fp16/`
and so on. A variant whose folder's manifest already records the same source (weights and config sha256),
the same options and the same phi-onnx version is not exported again, and its verification is reused when it
was made with the same inputs and limits; `force=True` rebuilds everything. One failing variant does not stop
the others. `OUTPUT/summary.md` and `OUTPUT/summary.json` list every variant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import traceback
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from phi_onnx.errors import OptionsError, PhiOnnxError
from phi_onnx.export.options import ExportOptions
from phi_onnx.manifest import ManifestError, read_manifest
from phi_onnx.paths import expand_user
from phi_onnx.verify import (
    DEFAULT_THRESHOLDS,
    SAMPLE_TEXT,
    OnnxRunError,
    Thresholds,
    VerifyError,
    VerifySettings,
    default_thresholds,
    read_prompts,
    read_text,
    verify,
)
from phi_onnx.verify.inspect import human_size

log = logging.getLogger(__name__)

GROUPS = {"cpu": "cpu_and_mobile", "cuda": "cuda"}
VARIANT_NAME = re.compile(
    r"^(?P<device>cpu|cuda)-(?P<precision>fp32|fp16|int4)"
    r"(?:-(?P<kind>rtn|rtn-asym)-block-(?P<block>\d+))?(?:-acc-level-(?P<acc>\d))?$")
RECIPE_HINT = "See the recipe format in the README (`phi-onnx build`), or recipes/phi.yaml."


def option_keys() -> tuple[str, ...]:
    """The export options a variant mapping may set: every ExportOptions field the command line has (so a new
    field is a recipe key too), in field order."""
    return tuple(item.name for item in fields(ExportOptions) if item.metadata.get("cli", True))


class RecipeError(PhiOnnxError):
    """The recipe file is missing, not YAML, or describes something invalid."""


@dataclass(frozen=True)
class Variant:
    """One model x options to build."""

    model: str
    source: str
    revision: str | None
    options: ExportOptions
    verify: bool = True

    @property
    def name(self) -> str:
        """The published repos' folder name: accuracy level spelled out for CPU int4 (and non-default CUDA)."""
        name = self.options.variant()
        level = self.options.effective_accuracy_level
        if self.options.precision == "int4" and (self.options.device == "cpu" or level != 0):
            name += f"-acc-level-{level}"
        return name

    @property
    def relative_dir(self) -> Path:
        """Where it goes under the output folder: MODEL/GROUP/NAME."""
        return Path(self.model) / GROUPS[self.options.device] / self.name


@dataclass
class Recipe:
    """A parsed recipe."""

    path: Path
    output: Path
    variants: list[Variant]
    verify: bool = True
    settings: VerifySettings = field(default_factory=VerifySettings)
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    verify_device: str = "cpu"


def parse_variant(spec: str | dict[str, Any], base: Path | None = None) -> ExportOptions:
    """ExportOptions from a variant name (`cpu-int4-rtn-block-32`, `cuda-fp16`, ...) or a mapping
    `{variant: NAME, OPTION: VALUE, ...}` whose options (any of `option_keys()`, typed as ExportOptions' fields)
    override the name's. Relative paths among them (`calibration`, `merge_adapter`, `adapters: {NAME: PATH}`)
    are relative to `base`, the recipe's folder, where given."""
    overrides: dict[str, Any] = {}
    if isinstance(spec, dict):
        overrides = dict(spec)
        text = overrides.pop("variant", None)
        # YAML keys need not be strings (`0:`, `? 08`, a bare `?` is None): name them as written.
        keys = option_keys()
        unknown = sorted(str(key) for key in set(overrides) - set(keys))
        if unknown:
            raise RecipeError(f"Unknown variant option(s): {', '.join(unknown)}.",
                              hint=f"Variant options are: variant, {', '.join(keys)}.")
        if text is None:
            text = f"{overrides.get('device', 'cpu')}-{overrides.get('precision', 'int4')}"
    else:
        text = spec
    if not isinstance(text, str):
        raise RecipeError(f"A variant must be a name or a mapping, not {spec!r}.", hint=RECIPE_HINT)
    match = VARIANT_NAME.match(text.strip())
    if not match:
        raise RecipeError(f"Unknown variant {text!r}.",
                          hint="Use DEVICE-PRECISION[-rtn|-rtn-asym-block-N][-acc-level-L], e.g. "
                               "cpu-int4-rtn-block-32, cpu-fp32, cuda-fp16, cuda-int4-rtn-block-32.")
    values: dict[str, Any] = {"device": match["device"], "precision": match["precision"]}
    if match["block"]:
        if match["precision"] != "int4":
            raise RecipeError(f"Variant {text!r}: block sizes apply to int4 only.", hint=RECIPE_HINT)
        values["block_size"] = int(match["block"])
        values["symmetric"] = match["kind"] == "rtn"
        values["algo"] = "rtn"  # the name says so, whatever the export default is
    if match["acc"]:
        values["accuracy_level"] = int(match["acc"])
    values.update(_relative_paths(overrides, base) if base is not None else overrides)
    try:
        return ExportOptions(**values)
    except TypeError as error:
        raise RecipeError(f"Variant {text!r}: {error}.", hint=RECIPE_HINT) from error
    except OptionsError as error:
        raise RecipeError(f"Variant {text!r}: {error.message}", hint=error.hint) from error


def _relative_paths(overrides: dict[str, Any], base: Path) -> dict[str, Any]:
    """Path options read against the recipe's folder, like every other path in a recipe (values of the wrong
    type are left for ExportOptions to refuse, naming the option)."""
    out = dict(overrides)

    def resolve(value: Any) -> Any:
        return str(base / value) if isinstance(value, str) and value and "\0" not in value else value

    for item in fields(ExportOptions):
        if "path" not in item.metadata or item.name not in out:
            continue
        value = out[item.name]
        if item.name == "adapters" and isinstance(value, dict):
            out[item.name] = {name: resolve(path) for name, path in value.items()}
        elif item.name == "adapters" and isinstance(value, list):
            out[item.name] = [[pair[0], resolve(pair[1])] if isinstance(pair, list | tuple) and len(pair) == 2
                              else pair for pair in value]
        else:
            out[item.name] = resolve(value)
    return out


def load_recipe(path: str | os.PathLike[str], output: str | os.PathLike[str] | None = None) -> Recipe:
    """Read and validate a recipe; `output` overrides its `output`."""
    import yaml

    file = expand_user(path, what="The recipe path", error=RecipeError)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise RecipeError(f"Cannot read the recipe {file}: {error.strerror or error}.", hint=RECIPE_HINT) from error
    except UnicodeDecodeError as error:
        raise RecipeError(f"The recipe {file} is not UTF-8 text (byte {error.start}: "
                          f"{error.object[error.start:error.start + 1]!r}); a recipe is a YAML file.",
                          hint=RECIPE_HINT) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RecipeError(f"{file} is not valid YAML: {error}", hint=RECIPE_HINT) from error
    return parse_recipe(data, file, output)


def parse_recipe(data: Any, file: Path, output: str | os.PathLike[str] | None = None) -> Recipe:
    """Validate a recipe already read from `file` (paths in it are relative to the file's folder)."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), list) or not data["models"]:
        raise RecipeError(f"{file} must be a mapping with a non-empty `models` list.", hint=RECIPE_HINT)
    unknown = _unknown(data, {"output", "verify", "verification", "variants", "models"})
    if unknown:
        raise RecipeError(f"{file}: unknown key(s) {unknown}.", hint=RECIPE_HINT)
    base = file.parent
    out_spec = output or data.get("output") or "out"
    if not isinstance(out_spec, (str, os.PathLike)) or "\0" in os.fspath(out_spec):
        raise RecipeError(f"`output` must be a folder path, not {out_spec!r}.", hint=RECIPE_HINT)
    out = expand_user(out_spec, what="The output folder", error=RecipeError)
    default_variants = _list(data.get("variants"), "`variants`")
    variants: list[Variant] = []
    seen: dict[Path, str] = {}
    for entry in data["models"]:
        if not isinstance(entry, dict) or not entry.get("source"):
            raise RecipeError(f"Each model needs a `source` (short name, hub id or folder); got {entry!r}.",
                              hint=RECIPE_HINT)
        unknown = _unknown(entry, {"name", "source", "revision", "variants", "verify"})
        if unknown:
            raise RecipeError(f"Model {entry['source']!r}: unknown key(s) {unknown}.",
                              hint="A model has: name, source, revision, variants, verify.")
        if not isinstance(entry["source"], str) or "\0" in entry["source"]:
            raise RecipeError(f"Model source {entry['source']!r} must be a short name, hub id or folder.",
                              hint=RECIPE_HINT)
        source = entry["source"]
        if (base / source).is_dir():  # folders are relative to the recipe, like every other path in it
            source = str((base / source).resolve())
        name = _model_name(entry.get("name"), source)
        revision = entry.get("revision")
        if revision is not None and not isinstance(revision, (str, int)):
            raise RecipeError(f"Model {name!r}: `revision` must be a branch, tag or commit.", hint=RECIPE_HINT)
        specs = _list(entry.get("variants"), f"Model {name!r}: `variants`") or default_variants
        if not specs:
            raise RecipeError(f"Model {name!r} lists no variants and the recipe has no default `variants`.",
                              hint=RECIPE_HINT)
        for spec in specs:
            variant = Variant(name, source, None if revision is None else str(revision), parse_variant(spec, base),
                              verify=bool(entry.get("verify", True)))
            if not _inside(out / variant.relative_dir, out):  # _model_name makes this hold; never write outside
                raise RecipeError(f"Model {name!r} would be written outside {out}.", hint=RECIPE_HINT)
            if variant.relative_dir in seen:
                raise RecipeError(f"Two variants of {name!r} would share the folder {variant.relative_dir}.",
                                  hint="Make them differ in precision, device, block size or accuracy level.")
            seen[variant.relative_dir] = name
            variants.append(variant)
    verification = data.get("verification") or {}
    if not isinstance(verification, dict):
        raise RecipeError("`verification` must be a mapping.", hint=RECIPE_HINT)
    allowed = {"prompts", "text", "new_tokens", "text_tokens", "window", "builtin_prompts", "thresholds", "device"}
    unknown = _unknown(verification, allowed)
    if unknown:
        raise RecipeError(f"Unknown `verification` key(s): {unknown}.",
                          hint=f"Allowed: {', '.join(sorted(allowed))}.")
    for key in ("prompts", "text", "device"):
        value = verification.get(key)
        if value is not None and (not isinstance(value, str) or "\0" in value):
            raise RecipeError(f"`verification.{key}` must be " + ("a device name" if key == "device" else
                              "a file path (relative to the recipe)") + f", not {value!r}.", hint=RECIPE_HINT)
    prompts: tuple[str, ...] = ()
    if verification.get("prompts"):
        prompts = tuple(read_prompts(base / verification["prompts"]))
    text = read_text(base / verification["text"]) if verification.get("text") else SAMPLE_TEXT
    try:
        settings = VerifySettings(
            prompts=prompts, prompts_source=str(verification.get("prompts") or "builtin"),
            use_builtin_prompts=bool(verification.get("builtin_prompts", True)) or not prompts,
            text=text, text_source=str(verification.get("text") or "builtin"),
            new_tokens=_count(verification, "new_tokens", 32, 1),
            text_tokens=_count(verification, "text_tokens", 1024, 2), window=_count(verification, "window", 256, 2))
    except VerifyError as error:  # refused now, not once per variant after each export
        raise RecipeError(f"{file}: {error.message}", hint=error.hint) from None
    thresholds = verification.get("thresholds") or {}
    if not isinstance(thresholds, dict) or not all(isinstance(v, dict) for v in thresholds.values()):
        raise RecipeError("`verification.thresholds` maps a precision to {figure: limit}.",
                          hint="For example: thresholds: {int4: {top1_agreement: 0.85}}.")
    figures = {f.name for f in fields(Thresholds)}
    for precision, limits in thresholds.items():
        bad = _unknown(limits, figures)
        if precision not in DEFAULT_THRESHOLDS or bad:
            raise RecipeError(f"`verification.thresholds.{precision}`: unknown "
                              + (f"figure(s) {bad}." if bad else "precision."),
                              hint=f"Precisions: {', '.join(DEFAULT_THRESHOLDS)}; "
                                   f"figures: {', '.join(sorted(figures))}.")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in limits.values()):
            raise RecipeError(f"`verification.thresholds.{precision}`: limits must be numbers.", hint=RECIPE_HINT)
        try:
            Thresholds(**limits)  # finite, and in each figure's range
        except VerifyError as error:
            raise RecipeError(f"`verification.thresholds.{precision}`: {error.message}", hint=error.hint) from None
    return Recipe(file, out, variants, verify=bool(data.get("verify", True)), settings=settings,
                  thresholds={str(k): dict(v) for k, v in thresholds.items()},
                  verify_device=str(verification.get("device", "cpu")))


def _unknown(mapping: dict[Any, Any], allowed: set[str]) -> str:
    """The keys of `mapping` not in `allowed`, listed (keys YAML read as numbers included)."""
    return ", ".join(sorted(str(key) for key in mapping if key not in allowed))


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RecipeError(f"{what} must be a list of variants, not {value!r}.", hint=RECIPE_HINT)
    return value


def _count(mapping: dict[str, Any], key: str, default: int, minimum: int) -> int:
    value = mapping.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RecipeError(f"`verification.{key}` must be a whole number of at least {minimum}, not {value!r}.",
                          hint=RECIPE_HINT)
    return value


def _model_name(name: Any, source: str) -> str:
    """The model's folder name: one plain path component, so every variant stays inside the output."""
    if name is None:
        # The source's last part: a hub id's model name, a folder's name
        name = (Path(source).name or source).replace("/", "--")
    if isinstance(name, (int, float)) and not isinstance(name, bool):
        name = str(name)  # `name: 2024` reads as a number
    if not isinstance(name, str) or name.strip() in ("", ".", "..") or any(c in name for c in "/\\\0") \
            or Path(name).is_absolute() or name != name.strip():
        raise RecipeError(f"Model name {name!r} is not a folder name: it must be one path component (no /, \\, "
                          "'..', '.', leading or trailing spaces, not empty).",
                          hint="Name the model's folder plainly, e.g. `name: phi-3-mini-4k-instruct-onnx`.")
    return name


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


# --------------------------------------------------------------------------- building


@dataclass
class Row:
    """One variant's outcome, a row of the summary."""

    model: str
    variant: str
    folder: str
    status: str = "pending"  # built | skipped | failed
    verification: str = "not run"  # passed | failed | skipped | reused-passed | reused-failed | disabled | not run
    reason: str = ""
    size_bytes: int = 0
    seconds: float = 0.0
    figures: dict[str, float] = field(default_factory=dict)
    failed_figures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """The export exists and its verification did not fail."""
        return self.status != "failed" and self.verification not in ("failed", "reused-failed", "not run")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["passed"] = self.passed
        return data


@dataclass
class BuildResult:
    """Every variant's row, and where the summaries were written."""

    output: Path
    rows: list[Row]

    @property
    def passed(self) -> bool:
        """True when every variant was built (or skipped as up to date) and none failed verification."""
        return all(row.passed for row in self.rows)


def _source_fingerprint(source: str, revision: str | None, cache: dict[tuple[str, str | None], dict[str, str]]
                        ) -> dict[str, str]:
    """The checkpoint's folder, weights and config sha256 (what the manifest records), once per source."""
    key = (source, revision)
    if key not in cache:
        from phi_onnx.source.checkpoint import Checkpoint
        from phi_onnx.source.hub import resolve_source

        resolved = resolve_source(source, revision=revision)
        config = resolved.path / "config.json"
        cache[key] = {
            "path": str(resolved.path),
            "weights_sha256": Checkpoint(resolved.path).sha256(),
            "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else "",
        }
    return cache[key]


def _up_to_date(folder: Path, variant: Variant, fingerprint: dict[str, str]) -> tuple[bool, str]:
    """Whether `folder` already holds this variant built from the same inputs, and if not, why."""
    from phi_onnx import __version__

    try:
        manifest = read_manifest(folder)
    except ManifestError:
        return False, "its manifest is unreadable"
    if manifest is None:
        return False, "first build"
    source = manifest.get("source") or {}
    if not isinstance(source, dict) or not isinstance(manifest.get("tools") or {}, dict):
        return False, "its manifest is damaged"
    if source.get("weights_sha256") != fingerprint["weights_sha256"]:
        return False, "the source weights changed"
    if source.get("config_sha256") != fingerprint["config_sha256"]:
        return False, "the source config.json changed"
    if manifest.get("options") != variant.options.to_dict():
        return False, "the options changed"
    if (manifest.get("tools") or {}).get("phi-onnx") != __version__:
        return False, "another phi-onnx version built it"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return False, "its manifest lists no files"
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        return False, f"files are missing ({', '.join(missing)})"
    return True, "same source, options and phi-onnx version"


def _thresholds_for(recipe: Recipe, precision: str) -> Thresholds:
    overrides = recipe.thresholds.get(precision, {})  # checked by load_recipe
    return default_thresholds(precision).with_overrides(**{k: float(v) for k, v in overrides.items()})


def _record_current(manifest: dict[str, Any], recipe: Recipe, thresholds: Thresholds) -> bool:
    """Whether the manifest's verification was made with these inputs and limits."""
    record = manifest.get("verification")
    if not isinstance(record, dict):
        return False
    key = recipe.settings.key()
    inputs = record.get("inputs") or {}
    return all(inputs.get(k) == v for k, v in key.items()) and record.get("thresholds") == thresholds.to_dict()


def build(recipe: Recipe, *, force: bool = False) -> BuildResult:
    """Export and verify every variant of `recipe`, then write OUTPUT/summary.md and summary.json.

    A variant that fails (export error, verification below its limits, anything raised) is recorded as
    failed and the build goes on with the next one.
    """
    from phi_onnx.export import export

    try:
        recipe.output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RecipeError(f"Cannot create the output folder {recipe.output}: {error.strerror or error}.",
                          hint="Choose an output folder you can write to (`output:` or -o).") from error
    _refuse_foreign_summaries(recipe.output)
    fingerprints: dict[tuple[str, str | None], dict[str, str]] = {}
    references: dict[Path, Any] = {}
    rows: list[Row] = []
    for index, variant in enumerate(recipe.variants, 1):
        folder = recipe.output / variant.relative_dir
        row = Row(variant.model, variant.name, str(variant.relative_dir))
        rows.append(row)
        started = time.perf_counter()
        log.info("[%d/%d] %s %s", index, len(recipe.variants), variant.model, variant.name)
        try:
            fingerprint = _source_fingerprint(variant.source, variant.revision, fingerprints)
            fresh, why = _up_to_date(folder, variant, fingerprint)
            if fresh and not force:
                row.status, row.reason = "skipped", f"up to date: {why}"
                log.info("  skipped: %s", why)
            else:
                log.info("  exporting (%s)", "--force" if force and fresh else why)
                export(fingerprint["path"], folder, variant.options, overwrite=True)
                row.status = "built"
            if recipe.verify and variant.verify:
                _verify_variant(recipe, variant, folder, row, references)
            else:
                row.verification = "disabled"
        except Exception as error:  # one variant's failure must not stop the others
            row.status = "failed" if row.status == "pending" else row.status
            if row.status != "failed":
                row.verification = "failed"
            row.reason = str(error).replace("\n", " ")
            log.error("  %s %s failed: %s", variant.model, variant.name, row.reason)
            if not isinstance(error, PhiOnnxError):
                log.debug("%s", traceback.format_exc())
        row.seconds = round(time.perf_counter() - started, 2)
        if folder.is_dir():
            row.size_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    result = BuildResult(recipe.output, rows)
    write_summary(result)
    return result


def _verify_variant(recipe: Recipe, variant: Variant, folder: Path, row: Row, references: dict[Path, Any]) -> None:

    thresholds = _thresholds_for(recipe, variant.options.precision)
    manifest = read_manifest(folder) or {}
    if row.status == "skipped" and _record_current(manifest, recipe, thresholds):
        record = manifest["verification"]
        row.verification = "reused-passed" if record.get("passed") else "reused-failed"
        row.figures = dict(record.get("figures") or {})
        row.failed_figures = list(record.get("failed") or [])
        return
    try:
        result = verify(folder, settings=recipe.settings, thresholds=thresholds,
                        device=recipe.verify_device, reference_cache=references)
    except OnnxRunError as error:
        if variant.options.device != "cuda":
            raise
        # CUDA exports are built on CPU machines; where CPU ONNX Runtime lacks a kernel, say so instead of failing.
        row.verification = "skipped"
        row.reason = f"verification skipped: {error.message}"
        log.warning("  %s", row.reason)
        return
    row.figures = dict(result.figures)
    row.failed_figures = result.failed
    row.verification = "passed" if result.passed else "failed"
    if not result.passed:
        row.reason = "below limits: " + ", ".join(result.failed)
    log.info("  verification %s", row.verification)


# --------------------------------------------------------------------------- summary


def summary_markdown(result: BuildResult) -> str:
    """The summary table in Markdown."""
    def figure(row: Row, name: str, fmt: str) -> str:
        value = row.figures.get(name)
        return "" if value is None else format(value, fmt)

    lines = ["| model | variant | folder | build | size | max abs logit diff | top-1 | KL | greedy | ppl change "
             "| verification | pass |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for row in result.rows:
        verdict = "yes" if row.passed else "**no**"
        note = row.verification + (f": {row.reason}" if row.reason and not row.passed else "")
        lines.append(
            f"| {row.model} | {row.variant} | `{row.folder}` | {row.status} | {human_size(row.size_bytes)} "
            f"| {figure(row, 'max_abs_logit_diff', '.3g')} | {figure(row, 'top1_agreement', '.4f')} "
            f"| {figure(row, 'kl_divergence', '.2e')} | {figure(row, 'greedy_agreement', '.3f')} "
            f"| {figure(row, 'perplexity_change', '.2%')} | {note.replace('|', '/')} | {verdict} |")
    passed = sum(row.passed for row in result.rows)
    lines.append("")
    lines.append(f"{passed} of {len(result.rows)} variants passed.")
    return "\n".join(lines) + "\n"


def _refuse_foreign_summaries(output: Path) -> None:
    """The summaries are rewritten on every build: refuse to replace files of that name a build did not write."""
    try:
        data = json.loads((output / "summary.json").read_text(encoding="utf-8"))
        ours = isinstance(data, dict) and isinstance(data.get("variants"), list) and "passed" in data
    except FileNotFoundError:
        ours = not (output / "summary.md").exists()  # neither file yet: a first build
    except (OSError, ValueError):
        ours = False
    # A build writes plain files; writing through a link would replace whatever it points to
    ours = ours and not any((output / name).is_symlink() for name in ("summary.md", "summary.json"))
    if not ours:
        raise RecipeError(f"{output} holds a summary.md or summary.json that `phi-onnx build` did not write; "
                          "a build would replace it.", hint="Choose another output folder (`output:` or -o).")


def write_summary(result: BuildResult) -> None:
    """OUTPUT/summary.md and OUTPUT/summary.json."""
    (result.output / "summary.md").write_text(summary_markdown(result), encoding="utf-8")
    data = {"passed": result.passed, "variants": [row.to_dict() for row in result.rows]}
    (result.output / "summary.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
