"""The threat lab's update source: the honest one, unless the party mix makes this participant misbehave.

`fedhe simulate` hands it to its simulated nodes (``participant.client_app.build_client_app``); a
deployed node only ever runs ``participant.local_update.honest_update``. Update attacks train
honestly, then replace the clipped update and skip clipping; data attacks follow the protocol on
poisoned data; colluders (``alie``, ``ipm``) re-compute each other's honest updates
(``fedhe.lab.malicious``). Every malicious participant reports all-zero rollout statistics, so the
released return describes the honest participants.
"""

from __future__ import annotations

import numpy as np

from fedhe.lab.malicious import (
    COLLUDING,
    DATA_ATTACKS,
    attacked_scenario,
    behaviour_for,
    colluders_honest_updates,
    craft_update,
)
from participant.local_update import NodeIdentity, honest_update, trainer_for
from protos import messages
from protos.update_units import clip_l2
from scenarios import Scenario

STATS_NONE = np.zeros(messages.STATS_LENGTH)


def party_mix_update(
    scenario: Scenario, identity: NodeIdentity, run_id: int, theta: np.ndarray, round_: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """A ``participant.local_update.UpdateSource``: this participant's behaviour in the run's party mix."""
    run = identity.run
    behaviour = behaviour_for(scenario, run.party_mix, identity.participant_index)
    if behaviour is None:
        return honest_update(scenario, identity, run_id, theta, round_, n)
    if behaviour.attack in DATA_ATTACKS:
        update, _ = honest_update(attacked_scenario(scenario, behaviour), identity, run_id, theta, round_, n)
        return update, STATS_NONE
    units = identity.plan.units(n)
    if behaviour.attack in COLLUDING:
        honest = colluders_honest_updates(behaviour, scenario, theta, round_, run.seed, identity.variant,
                                          units.clip, run.collusion_dir)
        crafted = craft_update(behaviour, honest[0], n=n, attacker_seed=run.seed, colluder_updates=honest)
        return units.encode_unclipped(crafted), STATS_NONE
    result = trainer_for(identity, scenario, run_id, round_).train(theta, round_, run.num_server_rounds)
    seed = run.seed * 1009 + identity.participant_index
    crafted = craft_update(behaviour, clip_l2(result.update, units.clip), n=n, attacker_seed=seed)
    return units.encode_unclipped(crafted), STATS_NONE  # never clipped
