"""Statistics over seeds and test questions: crossed seed × question intervals (`crossed`), per-question
linearisation of ratios and group summaries (`linearize`), multiple-comparison corrections (`multiple`), the
permutation test (`permutation`) and power planning (`power`). Pure functions over numpy arrays; the metrics
themselves (SPEC §5, §7) are in `chaintune.metrics`."""
from chaintune.stats.crossed import (
    Block, CrossedInterval, RunValues, VarianceTerm, blocks_from_runs, crossed_difference, crossed_estimate,
    crossed_interval, satterthwaite_df, variance_components,
)
from chaintune.stats.linearize import (
    BF_SUMMARIES, bf_g_pseudo_values, bf_summary_pseudo_values, group_means, group_pseudo_values, ratio_pseudo_values,
)
from chaintune.stats.multiple import CORRECTIONS, adjust_p_values, benjamini_hochberg, correction_name, holm
from chaintune.stats.permutation import PermutationTest, permutation_test
from chaintune.stats.power import (
    correlation_mde, correlation_points_needed, correlation_power, design_variance, minimal_detectable_effect, power,
    questions_needed, seeds_needed,
)

__all__ = [
    "Block", "CrossedInterval", "RunValues", "VarianceTerm", "blocks_from_runs", "crossed_difference",
    "crossed_estimate", "crossed_interval", "satterthwaite_df", "variance_components", "BF_SUMMARIES",
    "bf_g_pseudo_values", "bf_summary_pseudo_values", "group_means", "group_pseudo_values", "ratio_pseudo_values",
    "CORRECTIONS", "adjust_p_values", "benjamini_hochberg", "correction_name", "holm", "PermutationTest",
    "permutation_test", "correlation_mde", "correlation_points_needed", "correlation_power", "design_variance", "minimal_detectable_effect", "power", "questions_needed", "seeds_needed",
]
