"""The `phi-onnx` command line."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from phi_onnx import __version__
from phi_onnx.cli.errors import user_errors
from phi_onnx.cli.options import FiniteFloat, export_options, to_export_options


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, package_name="phi-onnx")
@click.option("-v", "--verbose", count=True, help="-v: show phi-onnx's steps; -vv: debug output of every library.")
def main(verbose: int) -> None:
    """Export Microsoft Phi checkpoints to optimized ONNX and run them with ONNX Runtime."""
    # Plain messages for users; logger names only when asked for detail. -v shows phi-onnx's own steps;
    # other libraries (onnx_ir logs INFO records with stack dumps) stay at WARNING unless -vv.
    fmt = "%(message)s" if verbose == 0 else "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose >= 2 else logging.WARNING, format=fmt)
    logging.getLogger("phi_onnx").setLevel(
        logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG)


def _show_steps(logger_name: str) -> None:
    """Commands that run for long say what they are doing on stderr even without -v (INFO for that logger)."""
    logger = logging.getLogger(logger_name)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)


@main.command()
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder to create (it appears only once the export is complete).")
@export_options()
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--verify", "run_verify", is_flag=True,
              help="Verify the export against its source afterwards (needs the reference extra); exit 1 if it "
                   "fails (the export stays, with the failing record in its manifest).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@user_errors
def export(source: str, output: str, revision: str | None, overwrite: bool, run_verify: bool, as_json: bool,
           **values: Any) -> None:
    """Export SOURCE (short name, hub id or local folder) to an ONNX model folder."""
    from phi_onnx.export import export as run_export

    options = to_export_options(values)
    if run_verify:
        from phi_onnx.verify import require_reference_extra

        require_reference_extra()  # refuse before a long export when the reference extra is missing
    result = run_export(source, output, options, overwrite=overwrite, revision=revision,
                        progress=not as_json and sys.stderr.isatty())
    verification = None
    if run_verify:
        from phi_onnx.verify import verify as run_verification

        _show_steps("phi_onnx.verify")
        verification = run_verification(result.output, revision=revision)
    if as_json:
        data = result.to_dict()
        if verification is not None:
            data["verification"] = verification.to_dict()
        click.echo(json.dumps(data, indent=2))
    else:
        size = sum(result.files.values()) / 1e6
        click.echo(f"Exported {source} ({result.architecture}) as {options.variant()} to {result.output} "
                   f"in {result.seconds:.1f} s, {size:.1f} MB.")
        if verification is not None:
            click.echo(verification.summary())
    if verification is not None and not verification.passed:
        sys.exit(1)


@main.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--reference", default=None,
              help="Reference checkpoint (short name, hub id or folder); default: the source in the manifest.")
@click.option("--revision", default=None, help="Hub revision of the reference.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None,
              help="More prompts: one per line, or a .json list of strings.")
@click.option("--no-builtin-prompts", is_flag=True, help="Use only the prompts from --prompts.")
@click.option("--text", "text_file", type=click.Path(dir_okay=False), default=None,
              help="Text for perplexity (default: a built-in documentation-style sample).")
@click.option("--new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Greedy tokens generated per prompt.")
@click.option("--text-tokens", type=click.IntRange(min=2), default=1024, show_default=True,
              help="At most this many tokens of the text, in --window windows.")
@click.option("--window", type=click.IntRange(min=2), default=256, show_default=True,
              help="Tokens per perplexity window (each runs without cache, on both sides).")
@click.option("--device", default="cpu", show_default=True, help="Where ONNX Runtime runs the export: cpu, auto, "
              "cuda or cuda:N.")
@click.option("--max-abs-logit-diff", type=FiniteFloat(min=0), default=None,
              help="Override the limit (upper bound).")
@click.option("--min-top1", type=FiniteFloat(0, 1), default=None,
              help="Override the top-1 agreement limit (lower bound, 0..1).")
@click.option("--max-kl", type=FiniteFloat(min=0), default=None,
              help="Override the mean KL divergence limit (upper bound).")
@click.option("--min-greedy", type=FiniteFloat(0, 1), default=None,
              help="Override the greedy agreement limit (lower bound, 0..1).")
@click.option("--max-ppl-change", type=FiniteFloat(min=0), default=None,
              help="Override the relative perplexity change limit (upper bound, e.g. 0.02 for 2 %).")
@click.option("--against", "against", type=click.Path(file_okay=False), default=None,
              help="Compare with another export of the model (e.g. its fp32 export) instead of the transformers "
                   "reference: the quality report of a quantized export; needs no torch.")
@click.option("--no-record", is_flag=True, help="Do not write the result into the folder's manifest.")
@click.option("--files", "files_only", is_flag=True,
              help="Only check every file against the sha256 in the manifest (fast, no reference); exit 1 if any "
                   "changed or is missing.")
@click.option("--json", "as_json", is_flag=True, help="Print the full record as JSON.")
@user_errors
def verify(folder: str, reference: str | None, revision: str | None, prompts_file: str | None,
           no_builtin_prompts: bool, text_file: str | None, new_tokens: int, text_tokens: int, window: int,
           device: str, max_abs_logit_diff: float | None, min_top1: float | None, max_kl: float | None,
           min_greedy: float | None, max_ppl_change: float | None, against: str | None, no_record: bool,
           files_only: bool, as_json: bool) -> None:
    """Compare the export in FOLDER with its transformers reference (or, with --against, another export of the
    model such as its fp32 export) on the same inputs.

    Reports max abs logit difference, top-1 agreement, KL divergence, greedy-token agreement and perplexity
    (both models, relative change), checks them against the precision's default limits (or the ones given),
    and records the result in FOLDER/phi_onnx.json. Exit code 0 when every limit holds, 1 when one does not,
    2 when verification cannot run.
    """
    from phi_onnx.verify import SAMPLE_TEXT, VerifySettings, read_prompts, read_text
    from phi_onnx.verify import verify as run_verification

    if files_only:
        from phi_onnx.verify.files import check_files

        check = check_files(folder)
        click.echo(json.dumps(check.to_dict(), indent=2) if as_json else check.summary())
        sys.exit(0 if check.ok else 1)
    prompts = tuple(read_prompts(prompts_file)) if prompts_file else ()
    settings = VerifySettings(
        prompts=prompts, prompts_source=prompts_file or "builtin", use_builtin_prompts=not no_builtin_prompts,
        text=read_text(text_file) if text_file else SAMPLE_TEXT, text_source=text_file or "builtin",
        new_tokens=new_tokens, text_tokens=text_tokens, window=window)
    overrides = {"max_abs_logit_diff": max_abs_logit_diff, "top1_agreement": min_top1, "kl_divergence": max_kl,
                 "greedy_agreement": min_greedy, "perplexity_change": max_ppl_change}
    _show_steps("phi_onnx.verify")
    result = run_verification(folder, reference=reference, revision=revision, settings=settings,
                              threshold_overrides=overrides, device=device, record=not no_record, against=against)
    if as_json:
        click.echo(json.dumps({"folder": str(result.folder), "recorded": result.recorded, **result.to_dict()},
                              indent=2))
    else:
        click.echo(result.summary())
    sys.exit(0 if result.passed else 1)


@main.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--check", "check", is_flag=True,
              help="Also check every file against the sha256 in the manifest; exit 1 if any changed or is missing.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
@user_errors
def inspect(folder: str, check: bool, as_json: bool) -> None:
    """Show what an export FOLDER holds: precision, ops, size, inputs/outputs, provenance, verification."""
    from phi_onnx.verify.inspect import format_report, inspect_folder

    info = inspect_folder(folder, check_files=check)
    click.echo(json.dumps(info, indent=2) if as_json else format_report(info))
    if check and not info["file_check"]["ok"]:
        sys.exit(1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
@user_errors
def doctor(as_json: bool) -> None:
    """Explain why CUDA does or does not work here, and spell out install mistakes with their fix.

    Exit code 1 when a problem marked ERROR was found, else 0 (CPU only is not an error).
    """
    from phi_onnx.runtime.doctor import format_report, run_doctor

    report = run_doctor()
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))
    sys.exit(1 if any(problem.severity == "error" for problem in report.problems) else 0)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: the recipe's `output`).")
@click.option("--force", is_flag=True, help="Rebuild every variant, even those whose manifest is up to date.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def build(recipe: str, output: str | None, force: bool, as_json: bool) -> None:
    """Export and verify every model x variant of a YAML RECIPE, laid out like the published ONNX repos.

    Writes OUTPUT/summary.md and OUTPUT/summary.json. Up-to-date variants are skipped. Exit code 0 when every
    variant passed, 1 when one failed, 2 for a bad recipe.
    """
    from phi_onnx.verify.build import build as run_build
    from phi_onnx.verify.build import load_recipe, summary_markdown

    _show_steps("phi_onnx.verify")  # the build's own progress lines and each variant's verification steps
    result = run_build(load_recipe(recipe, output), force=force)
    if as_json:
        click.echo(json.dumps({"output": str(result.output), "passed": result.passed,
                               "variants": [row.to_dict() for row in result.rows]}, indent=2))
    else:
        click.echo(summary_markdown(result), nl=False)
    sys.exit(0 if result.passed else 1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable list.")
def models(as_json: bool) -> None:
    """List the short model names, their hub ids, and which are supported today."""
    from phi_onnx.export.registry import is_supported
    from phi_onnx.source.models import KNOWN_MODELS

    rows = [{"name": m.name, "aliases": list(m.aliases), "hub_id": m.hub_id, "architecture": m.architecture,
             "supported": is_supported(m.architecture),
             "note": m.description if is_supported(m.architecture) else ""}
            for m in KNOWN_MODELS]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) + sum(len(a) + 2 for a in r["aliases"]) for r in rows) + 2
    click.echo(f"{'NAME':<{width}} {'HUB ID':<38} {'EXPORTS':<8} NOTE")
    for r in rows:
        name = r["name"] + "".join(f", {a}" for a in r["aliases"])
        status = "yes" if r["supported"] else "not yet"
        click.echo(f"{name:<{width}} {r['hub_id']:<38} {status:<8} {r['note']}")


@main.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable list.")
@user_errors
def list_store(as_json: bool) -> None:
    """List the models in the local store ($PHI_ONNX_HOME, default ~/.cache/phi-onnx).

    `phi-onnx chat NAME` (and generate, bench) exports a short name, hub id or checkpoint folder into the
    store on first use; later runs reuse the entry.
    """
    from phi_onnx.paths import printable
    from phi_onnx.store import list_entries, store_root

    entries = list_entries()
    if as_json:  # exact names (JSON escapes control characters itself)
        click.echo(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    if not entries:
        click.echo(f"The store ({printable(str(store_root()))}) is empty; `phi-onnx chat tiny-phi3` adds the "
                   "bundled model.")
        return
    # Names and sources are whatever the user typed (a checkpoint path): escape what a terminal would obey
    rows = [tuple(printable(cell) for cell in (
        e.id, e.name or "?", e.variant or "?", f"{e.size_bytes / 1e6:.1f} MB",
        "DAMAGED" if e.damaged else {True: "passed", False: "FAILED", None: "no"}[e.verified], e.source))
        for e in entries]
    header = ("ID", "NAME", "VARIANT", "SIZE", "VERIFIED", "SOURCE")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        click.echo("  ".join(f"{cell:<{w}}" for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    for entry in entries:
        if entry.damaged:
            click.echo(f"{entry.id} is damaged: {printable(entry.damaged)}; `phi-onnx rm {entry.id}` removes it.")


@main.command()
@click.argument("name_or_id")
@user_errors
def rm(name_or_id: str) -> None:
    """Remove store entries by NAME (every variant of it) or ID (see `phi-onnx list`)."""
    from phi_onnx.paths import printable
    from phi_onnx.store import remove_entries

    for entry in remove_entries(name_or_id):
        damaged = f", damaged: {entry.damaged}" if entry.damaged else ""
        click.echo(printable(f"Removed {entry.name or '?'} ({entry.variant or '?'}, {entry.size_bytes / 1e6:.1f} MB"
                             f"{damaged}), id {entry.id}."))


from phi_onnx.cli.adapter import adapter  # noqa: E402 - registered after the group exists
from phi_onnx.cli.quantize import quantize  # noqa: E402 - registered after the group exists
from phi_onnx.cli.run import bench, chat, generate  # noqa: E402 - registered after the group exists
from phi_onnx.cli.serve import serve  # noqa: E402

for _command in (chat, generate, bench, serve, quantize, adapter):
    main.add_command(_command)
