"""The shipped units give the supervisor what issue 12 asks of it on a box short of memory: it is
the OOM killer's last choice (systemd lowers its oom_score_adj, which it may not do itself), and
its cgroup is delegated to it, writable, so that build.memory_max can cap a build."""

from __future__ import annotations

import pytest

from supervisor.drivers.build import BUILD_OOM_SCORE_ADJ
from supervisor.drivers.child import SUPERVISOR_OOM_SCORE_ADJ
from tests.test_units import UNIT_FILES, directives


@pytest.mark.parametrize(("source", "name"), UNIT_FILES)
def test_the_unit_protects_the_supervisor_and_delegates_its_memory_cgroup(source, name):
    unit = directives(source)

    def one(key: str) -> str:
        values = unit.get(("Service", key), [])
        assert len(values) == 1, f"{key}=: {values}"
        return values[0]

    assert int(one("OOMScoreAdjust")) <= SUPERVISOR_OOM_SCORE_ADJ < 0 < BUILD_OOM_SCORE_ADJ
    assert "memory" in one("Delegate").split() or one("Delegate") == "yes"
    # ProtectControlGroups=yes mounts /sys/fs/cgroup read-only, the delegated cgroup included.
    assert one("ProtectControlGroups") == "no"
