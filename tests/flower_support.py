"""What the Flower tests share: a Grid stand-in and Flower's task identity for hand-built Messages."""

from __future__ import annotations

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(scope="module", autouse=True)
def flower_identity():
    """Flower 1.42 stamps instruction messages with the task's run/node/task ids (a simulation sets them)."""
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class Grid:
    """Just what FedAvg.configure_train asks of a Grid."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)
