import distload
from tests import jobs


def test_example_loads_complete_at_world_4(pool):
    directory = distload.example_checkpoint()
    reports = pool.run(4, jobs.load_summary, directory, 2)
    assert all(r["complete"] for r in reports), reports[0]
    assert reports[0]["layout"] == {"world_size": 4, "tp": 2, "dp": 2, "pp": 1, "ep": 1}
