"""`h3fusion report`: ``<run>/report.md`` + ``<run>/plots/*.png`` from results.json, and the fused
model's card (``<run>/fused/README.md``).

    markdown    write_report: the report itself, section by section
    statistics  per-prompt values, paired hhh and headline bootstrap replicates, one system against another
    specialisation  each expert against the others on its own axis (``specialisation.json``)
    targets     the study's targets (issue 18), met or missed one by one
    tables      the markdown tables and judge lines (columns from the axes' specs)
    plots       the PNG plots
    card        the fused model's card
"""

from h3fusion.report.markdown import write_report

__all__ = ["write_report"]
