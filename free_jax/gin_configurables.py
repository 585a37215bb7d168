"""The decoding specs and evaluation settings gin files name, registered once, here.

Library code never imports gin; the entry points that read decoding run files (`evaluate`,
`calibrate`) import this module, so each process registers what its own gin files reference
(`@FreeSpec()`, `@EvalSettings()`, ...) whichever entry point it started from. Every field of every
spec is then a binding:

    SuiteSpec.free = @FreeSpec()
    FreeSpec.window = 16
    FreeSpec.measure = 'softmax_max'      # 'learned' also needs evaluate.confidence_head
    FreeSpec.rollback = 0.5
    CalmSpec.min_exit = 2
    SuiteSpec.static = @StaticSpec()
    StaticSpec.exit_layer = 3
"""

from __future__ import annotations

import gin

from free_jax.decoding.specs import SPECS
from free_jax.evaluation import EvalSettings, SuiteSpec

CONFIGURABLES = (*SPECS, EvalSettings, SuiteSpec)

for _cls in CONFIGURABLES:
    gin.external_configurable(_cls, module="free_jax")
