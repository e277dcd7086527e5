"""The report: every figure of the current state, the tables, and one self-contained HTML file.

`build_report` is what both the Report page and `python -m spectral report` call, so the two write the same file.
Analysis figures always; what-if figures (compression against KL for the reference strategies and the chosen cut,
and the sensitivity heatmap) when a what-if session is given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go

from spectral import figures
from spectral.analysis import Analysis, Settings, role_table
from spectral.export import matrix_rows
from spectral.whatif import Choice, WhatIfResult, WhatIfSession
from spectral.workspace import Workspace


@dataclass
class ReportFigure:
    title: str
    stem: str  # file name without extension
    figure: go.Figure


@dataclass
class Report:
    """Figures and tables of one checkpoint at one setting, ready to show, export or write as HTML."""

    title: str
    header: list[tuple[str, str]]
    figures: list[ReportFigure]
    tables: list[tuple[str, list[dict]]]
    whatif: WhatIfResult | None = None
    notes: list[str] = field(default_factory=list)

    def html(self) -> str:
        """One self-contained HTML file: interactive figures (plotly.js embedded once) and tables; opens offline."""
        return figures.report_html(self.title, self.header, [(f.title, f.figure) for f in self.figures], self.tables)

    def write_figures(self, folder: Path, formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
        """Each figure as an image per format (kaleido and a local Chromium), named by its stem; the paths written."""
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for fig in self.figures:
            for fmt in formats:
                path = folder / f"{figures.safe_filename(fig.stem)}.{fmt}"
                path.write_bytes(figures.figure_to_image(fig.figure, fmt))
                written.append(path)
        return written


def default_matrix(analysis: Analysis) -> str:
    """The matrix the spectrum figures show unless chosen: the one with the most signal singular values."""
    return max(analysis.matrices, key=lambda r: r.n_signal).name


def analysis_figures(workspace: Workspace, analysis: Analysis, *, matrix: str | None = None, role: str | None = None,
                     log_x: bool = False) -> list[ReportFigure]:
    """Rank contrast by role and by matrix, parameters kept, one matrix's spectrum and scree plot, and the spectra of
    one role as small multiples."""
    if not analysis.matrices:
        return []
    spectra = workspace.spectra()
    reports = {r.name: r for r in analysis.matrices}
    matrix = matrix if matrix in reports else default_matrix(analysis)
    role = role or reports[matrix].role
    chosen = [r for r in analysis.matrices if r.role == role]
    context = figures.context_line(analysis)
    s = analysis.settings
    return [
        ReportFigure("Signal rank vs energy rank by role", "ranks-by-role",
                     figures.rank_contrast_by_role(analysis, role_table(analysis))),
        ReportFigure("Signal rank vs energy rank by matrix", "ranks-by-matrix",
                     figures.rank_contrast_by_matrix(analysis)),
        ReportFigure("Parameters kept", "params-kept", figures.params_kept_bars(analysis)),
        ReportFigure(f"Spectrum of {matrix}", f"spectrum-{matrix}",
                     figures.spectrum_histogram(spectra[matrix], reports[matrix], settings=s, context=context,
                                                log_x=log_x)),
        ReportFigure(f"Singular values of {matrix}", f"scree-{matrix}",
                     figures.scree_plot(spectra[matrix], reports[matrix], settings=s, context=context)),
        ReportFigure(f"Spectra of every {role} matrix", f"spectra-{role}",
                     figures.spectrum_grid([spectra[r.name] for r in chosen], chosen,
                                           title=f"Spectra of every {role} matrix", settings=s, context=context,
                                           log_x=log_x)),
    ]


def whatif_figures(session: WhatIfSession, choice: Choice, settings: Settings, analysis: Analysis, *,
                   scan_by: str | None = None) -> tuple[list[ReportFigure], WhatIfResult]:
    """Compression against KL (reference strategies and `choice`) and, with `scan_by`, the sensitivity heatmap."""
    result = session.run(choice, settings)
    encoder = session.kind == "encoder"
    title = "Compression against " + ("embedding damage" if encoder else "KL")
    context = figures.context_line(analysis)
    out = [ReportFigure(title, "compression-vs-kl", figures.compression_vs_kl(
        session.reference(choice.scope, settings), current=result.point(), title=title,
        damage="cosine" if encoder else "kl", context=f"{context} · scope {choice.scope}"))]
    if scan_by:
        rows = session.scan(choice, by=scan_by, settings=settings)
        out.append(ReportFigure("Sensitivity", "sensitivity", figures.sensitivity_from_scan(
            rows, by=scan_by, title=f"Sensitivity: KL when one {scan_by} alone is cut ({choice.label})",
            context=context)))
    return out, result


def build_report(workspace: Workspace, settings: Settings = Settings(), *, label: str | None = None,
                 matrix: str | None = None, role: str | None = None, log_x: bool = False,
                 session: WhatIfSession | None = None, choice: Choice | None = None,
                 scan_by: str | None = None) -> Report:
    """The report of a workspace at `settings`; with a session, the what-if figures of `choice` (default: no cut)."""
    analysis = workspace.analyze(settings)
    ck = analysis.checkpoint
    label = label or figures.checkpoint_label(ck)
    header = [("Checkpoint", str(ck.get("path"))), ("sha256", str(ck.get("sha256"))), ("Format", str(ck.get("format"))),
              ("Parameters", f"{ck.get('n_params'):,}"), ("Settings", figures.settings_line(settings))]
    report = Report(f"Spectra Explorer report: {label}", header,
                    analysis_figures(workspace, analysis, matrix=matrix, role=role, log_x=log_x),
                    [("Matrix roles", role_table(analysis)), ("Weight matrices", matrix_rows(analysis))])
    if session is not None:
        more, report.whatif = whatif_figures(session, choice or Choice(), settings, analysis, scan_by=scan_by)
        report.figures.extend(more)
        header.append(("What-if", f"{report.whatif.label}: agreement {report.whatif.metrics.agreement:.1%}"))
    return report
