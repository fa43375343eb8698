"""The VDI model test: many examples in-process, fewer against real sheep processes."""

from __future__ import annotations

import pytest

from sheep.testing.inprocess import InProcessCluster
from sheep.testing.vdi_model import OBJECT_SIZE, machine_settings, make_machine


@pytest.fixture(scope="module")
def inprocess(tmp_path_factory):
    cluster = InProcessCluster(str(tmp_path_factory.mktemp("inprocess")), nodes=3).start()
    with cluster.client(0) as client:
        client.format(2, OBJECT_SIZE)
    yield cluster
    cluster.close()


def test_vdis_match_the_model_in_process(inprocess):
    machine = make_machine(inprocess.client, nodes=3)
    machine.TestCase.settings = machine_settings(max_examples=20, stateful_step_count=20)
    machine.TestCase().runTest()


def test_vdis_match_the_model_on_real_sheep(make_cluster):
    cluster = make_cluster(3)
    cluster.format(2, OBJECT_SIZE)
    machine = make_machine(cluster.client, nodes=3)
    machine.TestCase.settings = machine_settings(max_examples=5, stateful_step_count=12)
    machine.TestCase().runTest()
