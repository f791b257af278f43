"""KernelSwitch, behind ``vqgan.fused_group_norms`` and ``mage_attention.sdpa_attention``: off by default, set
for a ``with`` block, nested blocks restore the outer value, an exception inside restores it too, and other
threads do not see it."""
from __future__ import annotations

import threading

import pytest

from unlearn_fast.models.mage_attention import sdpa_attention
from unlearn_fast.models.vqgan import fused_group_norms


@pytest.mark.parametrize("switch", [fused_group_norms, sdpa_attention], ids=["fused_group_norms", "sdpa_attention"])
def test_switch_nests_restores_and_stays_in_its_thread(switch):
    assert switch.on() is False
    with switch():
        assert switch.on() is True
        with switch(False):
            assert switch.on() is False
        assert switch.on() is True
        seen = []
        thread = threading.Thread(target=lambda: seen.append(switch.on()))
        thread.start()
        thread.join()
        assert seen == [False]
    assert switch.on() is False
    with pytest.raises(RuntimeError):
        with switch():
            raise RuntimeError("inside")
    assert switch.on() is False
