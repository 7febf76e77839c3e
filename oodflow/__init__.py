"""oodflow's command line: the one console script over `training`, `service` and batch scoring.

It sits above both: `training` (build models) and `service` (serve and batch-score them) never
import it, and it imports each of them only inside the verb that needs it, so a serving install
without torch runs `oodflow serve` and `oodflow score-batch`.
"""

__all__: list[str] = []
