"""One nightly rescoring run in a process of its own, with a Ray of its own (as a scheduled run
and a manual rerun are): ``python tests/concurrent_job.py <inbox> <root> <date> <start_at>``.
Waits until the wall-clock time ``start_at`` so that several such processes overlap, then prints
the run's result as one JSON line."""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    inbox, root, date, start_at = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    import ray

    from asd.stages.featurize import FeaturizeConfig
    from asd.stages.rescore import RescoreConfig, rescore
    from asd.stages.score import ScoreConfig

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    time.sleep(max(0.0, start_at - time.time()))
    cfg = RescoreConfig(featurize=FeaturizeConfig(progress=False, batch_size=8, rows_per_block=16),
                        score=ScoreConfig(progress=False))
    res = rescore(inbox, root, date=date, cfg=cfg)
    print(json.dumps(res.to_dict()), flush=True)


if __name__ == "__main__":
    main()
