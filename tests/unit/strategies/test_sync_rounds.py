from downpour.strategies.sync import next_round


def test_a_worker_waits_for_every_shard_to_close_its_round():
    assert next_round([3, 3], total_rounds=10) == [4, 4]


def test_shards_a_version_apart_are_waited_for_shard_by_shard():
    # The worker pulled as shard 1 closed a round shard 0 had not closed yet.
    assert next_round([3, 4], total_rounds=10) == [4, 5]


def test_no_worker_waits_for_a_round_past_the_last():
    # Shard 1 took the last round; shard 0 still owes it. Waiting for shard 1's
    # round 11 would wait for pushes no worker makes (they stop at round 10).
    assert next_round([9, 10], total_rounds=10) == [10, 10]
