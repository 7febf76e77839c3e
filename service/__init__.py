"""oodflow's scoring service (DESIGN §6, §7).

- `service.core`: the HTTP-free scoring core (artifact loading and verification, graph runtimes,
  fitting images to a model, scores, ensembles' combined verdicts);
- the FastAPI app over it: `service.app.create_app(settings)` / `service.app.run(settings)`
  (`oodflow serve`), with routes, batcher, auth, metrics and settings beside it;
- the batch engines over it: `service.batch` (`oodflow score-batch`, local threads or Ray).

Importing `service` loads none of them: FastAPI and uvicorn load with `service.app` only.
"""

__all__: list[str] = []
