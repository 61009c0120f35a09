"""Offline judges that stand in for the paper's evaluators (none of which runs offline here).

    helpful  HelpfulJudge   P(answer preferred over text-davinci-003), GPT-4 AlpacaEval-1 stand-in
    harmless HarmlessJudge  P(harmful), beaver-dam-7b QA-moderation stand-in (> 0.5 = flagged)
    honest   HonestJudge    P(truthful) via score / score_truth, P(informative) via score_info
                            (GPT-judge / GPT-info stand-ins); score_both gives both

    fit_judges(config, cache_dir=None, log=print, axes=AXES, max_rows=None, force=False) -> {axis: validation}
    load_judges(config, cache_dir=None, log=print, axes=AXES, max_rows=None) -> {axis: Judge}

Every judge carries ``validation``: its figures on data it was not fitted on, including (by
construction) nothing of the evaluated test subsets (``config.evaluate``). They are stand-ins,
not GPT-4 / beaver-dam scores: report the validation figures beside every score. See
docs/judges.md for how far to trust each one.
"""

from h3fusion.judges.base import Judge
from h3fusion.judges.embedder import Embedder
from h3fusion.judges.fit import cache_key, fit_judges, judge_dir, load_judges
from h3fusion.judges.harmless import HarmlessJudge
from h3fusion.judges.helpful import HelpfulJudge
from h3fusion.judges.honest import HonestJudge

__all__ = ["Embedder", "HarmlessJudge", "HelpfulJudge", "HonestJudge", "Judge", "cache_key", "fit_judges",
           "judge_dir", "load_judges"]
