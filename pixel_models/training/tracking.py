"""Experiment tracking around the loggers: W&B's online/offline choice, the config as hyperparameters, one
finished W&B run per job, sweeps grouped and runs named by their overrides, what produced a run (code
version, command line, resolved config), and the end-of-sweep summary.

A sweep (``-m``) is one W&B group, ``<task_name>-<sweep directory name>``; each job is named by the overrides
that the sweep varies (``model=row_lstm model.optimizer.lr=0.0003``), a single run by its own overrides
(W&B picks a name when there are none); every run is tagged with its chosen config options
(``model:row_lstm``, ``data:digits``, ``experiment:...``). ``logger.wandb.group`` / ``name`` / ``tags``
given by the user win (tags are added to).
"""

import importlib.metadata
import json
import logging
import math
import netrc
import os
import shlex
import socket
import subprocess
import sys
import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

import lightning as L
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from pixel_models.training.builders import build

log = logging.getLogger("train")

WANDB_TARGET = "lightning.pytorch.loggers.WandbLogger"


def wandb_key_configured() -> bool:
    """An API key in WANDB_API_KEY or in the netrc file (where ``wandb login`` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        entries = netrc.netrc(os.environ.get("NETRC") or None)
    except (netrc.NetrcParseError, OSError):
        return False
    auth = entries.authenticators(host) if host else None
    return bool(auth and auth[2])


def wandb_offline(requested: bool | None) -> bool:
    """``logger.wandb.offline``: true / false as given; null (the default): as WANDB_MODE says if it is set,
    else offline unless an API key is configured, so that a run without one never prompts for a key or
    waits on the network."""
    if requested is not None:
        return bool(requested)
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "dryrun")
    return not wandb_key_configured()


class LogConfig(L.Callback):
    """Gives every logger the whole resolved run config as hyperparameters (provenance included), from inside
    the processes that train (a spawned process gets its loggers fresh: touching them in the parent would
    break them); the global-zero process also writes it to the run directory: ``config_resolved.yaml``,
    ``provenance.json`` and, when the checkout has uncommitted changes, ``code.diff`` (``git diff HEAD``)."""

    def __init__(self, config: dict, output_dir: str | None = None):
        self.config = config
        self.output_dir = output_dir
        self._logged = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self._logged:
            return
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config)
        if self.output_dir and trainer.is_global_zero:
            write_run_record(self.config, Path(self.output_dir))
        self._logged = True


def finish_wandb(loggers: list, exit_code: int) -> None:
    """Ends this job's W&B run, so that each job of a sweep has its own, and says how to upload an offline
    run."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if not isinstance(logger, WandbLogger) or logger._experiment is None:
            continue
        run = logger._experiment
        settings = getattr(run, "settings", None)
        offline = bool(getattr(settings, "_offline", False))
        sync_dir = getattr(settings, "sync_dir", None)
        run.finish(exit_code=exit_code)
        if offline and sync_dir:
            log.info(f"W&B ran offline; upload this run with:  wandb sync {sync_dir}")


def make_loggers(group: DictConfig | None) -> list:
    loggers = []
    for node in (group or {}).values():
        if node is None:
            continue
        if node.get("_target_") == WANDB_TARGET:
            offline = wandb_offline(node.get("offline"))
            online = not offline and os.environ.get("WANDB_MODE") != "disabled"
            log_model = node.get("log_model", False) if online else False  # artifacts need a server
            Path(node.save_dir).mkdir(parents=True, exist_ok=True)
            # A fixed id: processes that start afresh (ddp_spawn's, stage after stage) continue one run.
            run_id = node.get("id") or node.get("version") or uuid.uuid4().hex[:12]
            naming = wandb_naming(node)
            loggers.append(build(node, offline=offline, log_model=log_model, id=run_id, **naming))
        else:
            loggers.append(build(node))
    return loggers


# Sweeps, names and tags ------------------------------------------------------------------------------------

TAGGED_GROUPS = ("model", "data", "experiment", "hparams_search")
SWEEP_RECORD = "sweep.json"  # written by SweepTracking.on_multirun_start: which keys the sweep varies
SWEEP_SUMMARY = "sweep_summary.json"


def sweep_group(job_name: str, sweep_dir: str | Path) -> str:
    """The W&B group of a sweep's jobs: ``<job name>-<sweep directory name>`` (e.g.
    ``train-2026-12-01_21-50-00``), the same in every job and in the end-of-sweep summary."""
    return f"{job_name}-{Path(str(sweep_dir)).name}"[:128]


def _short(value: str) -> str:
    """A float override as 4 significant digits in a run name (the config keeps it exact)."""
    if any(ch in value for ch in ".eE"):
        try:
            number = float(value)
        except ValueError:
            return value
        if math.isfinite(number):
            return f"{number:.4g}"
    return value


def _bare_key(key: str) -> str:
    return key.lstrip("+~")


def run_name(overrides: list[str], swept: set[str] | None) -> str | None:
    """A run's name from its command-line overrides: in a sweep, those of the keys the sweep varies; else
    all but the logger's and Hydra's own. None when nothing is left (W&B then picks a name)."""
    parts = []
    for text in overrides:
        key, sep, value = text.partition("=")
        key = _bare_key(key)
        if not sep or text.startswith("~"):
            continue
        if swept:
            if key not in swept:
                continue
        elif key == "logger" or key.startswith(("logger.", "hydra.", "hydra/")) or key == "output_dir":
            continue
        parts.append(f"{key}={_short(value)}")
    return " ".join(parts)[:128] or None


def swept_keys(overrides: list[str], sweeper_params: dict | None) -> list[str]:
    """The keys a sweep varies: command-line sweeps (``model=a,b``, ``x=range(..)``, ``x=interval(..)``) and
    the sweeper's configured ``params`` (Optuna's search space)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = [_bare_key(str(key)) for key in (sweeper_params or {})]
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.is_sweep_override():
            keys.append(_bare_key(override.key_or_group))
    return list(dict.fromkeys(keys))


def _read_swept(sweep_dir: str) -> set[str] | None:
    """The keys the sweep varies, as SweepTracking recorded them (a file this project wrote: plain JSON,
    checked to be a list of strings); None without it."""
    path = Path(sweep_dir) / SWEEP_RECORD
    try:
        keys = json.loads(path.read_text()).get("swept")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        return None
    return set(keys)


def wandb_naming(node: DictConfig) -> dict:
    """group, name and tags of this job's W&B run (module docstring); the user's own group and name win.
    Outside a Hydra app (train() called directly) the node's values are kept as they are."""
    if not HydraConfig.initialized():
        return {}
    from hydra.types import RunMode

    hc = HydraConfig.get()
    choices = hc.runtime.choices
    tags = [str(t) for t in (node.get("tags") or [])]
    tags += [f"{g}:{choices[g]}" for g in TAGGED_GROUPS if choices.get(g) not in (None, "null")]
    naming = {"tags": list(dict.fromkeys(t[:64] for t in tags))}  # W&B: at most 64 characters a tag
    overrides = list(hc.overrides.task)
    if hc.mode == RunMode.MULTIRUN:
        naming["group"] = node.get("group") or sweep_group(hc.job.name, hc.sweep.dir)
        naming["name"] = node.get("name") or run_name(overrides, _read_swept(hc.sweep.dir))
    else:
        naming["name"] = node.get("name") or run_name(overrides, None)
    return naming


# Provenance: which code and command produced a run ---------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def code_version() -> dict:
    """The code that runs: ``git_commit`` of this checkout and ``git_dirty`` (tracked files differ from the
    commit; untracked files are not counted), when the package runs from a git checkout; always
    ``package_version``, the installed distribution's version."""
    try:
        version = {"package_version": importlib.metadata.version("pixel-models")}
    except importlib.metadata.PackageNotFoundError:
        version = {"package_version": None}
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != REPO_ROOT:
        return version  # not a checkout of this project (e.g. installed into site-packages)
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    if commit is None or status is None:
        return version
    return {"git_commit": commit.strip(), "git_dirty": bool(status.strip()), **version}


def provenance() -> dict:
    """What produced this run: code version, the exact command line, and (in a Hydra app) this job's
    overrides and the command that re-runs just this job."""
    info = {
        "code": code_version(),
        "command": shlex.join(["python", *sys.argv]),
        "python": sys.version.split()[0],
        "host": socket.gethostname(),
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        overrides = list(hc.overrides.task)
        info["overrides"] = overrides
        info["job_command"] = shlex.join(["python", f"{hc.job.name}.py", *overrides])
    return info


def write_run_record(config: dict, run_dir: Path) -> None:
    """``config_resolved.yaml`` (the whole resolved config, provenance included), ``provenance.json`` and,
    for a dirty checkout, ``code.diff``, in the run directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config_resolved.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    record = config.get("provenance")
    if record is None:
        return
    (run_dir / "provenance.json").write_text(json.dumps(record, indent=2) + "\n")
    if record["code"].get("git_dirty"):
        diff = _git("diff", "HEAD")
        if diff:
            (run_dir / "code.diff").write_text(diff)


def run_config(cfg: DictConfig) -> dict:
    """The whole resolved config, which option of each config group was chosen, and the provenance."""
    config = {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in cfg
        if key != "hydra"  # present when composed with Hydra's own config (tests): not the run's
    }
    if HydraConfig.initialized():
        config["choices"] = dict(HydraConfig.get().runtime.choices)
    config["provenance"] = provenance()
    return config


def restore_wandb_mode(before: str | None) -> None:
    """WandbLogger(offline=True) sets WANDB_MODE for the whole process: undo that for the next job."""
    if before is None:
        os.environ.pop("WANDB_MODE", None)
    else:
        os.environ["WANDB_MODE"] = before


# The end of a sweep ---------------------------------------------------------------------------------------


class SweepTracking(HydraCallback):
    """A Hydra callback (conf/hydra/default.yaml). At the start of a ``-m`` sweep it records which keys the
    sweep varies (``<sweep dir>/sweep.json``, so that every job, on any launcher, names its run by them); at
    the end it writes ``<sweep dir>/sweep_summary.json``: every job's overrides and value of
    ``optimized_metric``, the best job, and for Optuna the parameter importances; and with
    ``logger=wandb`` logs it as a ``sweep_summary`` run in the sweep's group."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "group": _summary_group(config),
            "swept": swept_keys(list(config.hydra.overrides.task), config.hydra.sweeper.get("params")),
            "command": shlex.join(["python", *sys.argv]),
            "code": code_version(),
        }
        (sweep_dir / SWEEP_RECORD).write_text(json.dumps(record, indent=2) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        summary = sweep_summary(config, sweep_dir)
        (sweep_dir / SWEEP_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        best = summary["best"]
        if best is not None:
            log.info(
                f"sweep: best {summary['metric']} = {best['value']:.6g} by job {best['job']} "
                f"({' '.join(best['overrides'])}); summary in {sweep_dir / SWEEP_SUMMARY}"
            )
        else:
            log.warning(f"sweep: no job reported {summary['metric']}; summary in {sweep_dir / SWEEP_SUMMARY}")
        logger_cfg = config.get("logger") or {}
        if logger_cfg.get("wandb") is not None and os.environ.get("WANDB_MODE") != "disabled":
            log_summary_to_wandb(config, summary, sweep_dir)


def _summary_group(config: DictConfig) -> str:
    user = (config.get("logger") or {}).get("wandb")
    user_group = user.get("group") if user is not None else None
    return user_group or sweep_group(config.hydra.job.name, config.hydra.sweep.dir)


def _direction(config: DictConfig) -> str:
    """Optuna's configured direction (its first, for several objectives); else minimize (val/nll)."""
    direction = config.hydra.sweeper.get("direction") or "minimize"
    if not isinstance(direction, str):
        direction = list(direction)[0]
    return str(direction)


def _job_sort_key(path: Path) -> list:
    return [int(p) if p.isdigit() else p for p in path.parts]


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def sweep_summary(config: DictConfig, sweep_dir: Path) -> dict:
    """Every job of the sweep directory (its ``.hydra/overrides.yaml`` and ``metrics.json``, files this
    project and Hydra wrote, read as plain data and type-checked), the best, and Optuna's importances."""
    metric = str(config.get("optimized_metric"))
    direction = _direction(config)
    swept = set(swept_keys(list(config.hydra.overrides.task), config.hydra.sweeper.get("params")))
    jobs = []
    for overrides_file in sorted(sweep_dir.glob("**/.hydra/overrides.yaml"), key=_job_sort_key):
        job_dir = overrides_file.parent.parent
        try:
            overrides = yaml.safe_load(overrides_file.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            continue
        try:
            metrics = json.loads((job_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            metrics = {}
        value = _number(metrics.get(metric)) if isinstance(metrics, dict) else None
        jobs.append(
            {
                "job": str(job_dir.relative_to(sweep_dir)),
                "name": run_name(overrides, swept),
                "overrides": overrides,
                "value": value,
            }
        )
    valued = [job for job in jobs if job["value"] is not None]
    pick = max if direction == "maximize" else min
    best = pick(valued, key=lambda job: job["value"]) if valued else None
    summary = {
        "sweep_dir": str(sweep_dir),
        "group": _summary_group(config),
        "metric": metric,
        "direction": direction,
        "num_jobs": len(jobs),
        "num_finished": len(valued),
        "best": best,
        "jobs": jobs,
    }
    if "optuna" in str(config.hydra.sweeper.get("_target_", "")).lower():
        summary["param_importances"], why = optuna_importances(config, valued, direction)
        if why:
            summary["param_importances_unavailable"] = why
    return summary


def optuna_importances(
    config: DictConfig, jobs: list[dict], direction: str
) -> tuple[dict | None, str | None]:
    """Optuna's parameter importances (``optuna.importance.get_param_importances``) over this sweep's
    finished jobs, as a study rebuilt from the sweeper's search space and each job's overrides (the
    sweeper keeps its study in memory unless a storage is configured). The evaluator is Optuna's mean
    decrease in impurity of a random forest (seed 0): its default, fANOVA, fails on the scikit-learn
    versions that the pinned optuna<3 meets today."""
    try:
        import optuna
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    except ImportError as err:
        return None, f"optuna is not installed ({err})"
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    params += list(config.hydra.overrides.task)
    distributions, fixed = create_params_from_overrides(params)
    for name in fixed:
        distributions.pop(name, None)
    if not distributions:
        return None, "the sweep has no search space"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = optuna.create_study(direction=direction)
    parser = OverridesParser.create()
    for job in jobs:
        given = {o.get_key_element(): o.value() for o in parser.parse_overrides(job["overrides"])}
        if not all(name in given for name in distributions):
            continue
        trial_params = {name: given[name] for name in distributions}
        study.add_trial(
            optuna.trial.create_trial(params=trial_params, distributions=distributions, value=job["value"])
        )
    if len(study.trials) < 2:
        return None, f"{len(study.trials)} finished trial(s): importances need at least 2"
    try:
        evaluator = optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0)
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError) as err:
        return None, f"optuna could not compute importances: {err}"
    return {name: float(value) for name, value in importances.items()}, None


def log_summary_to_wandb(config: DictConfig, summary: dict, sweep_dir: Path) -> None:
    """The summary as a W&B run of job type ``sweep_summary`` in the sweep's group: run summary keys
    ``best/value``, ``best/job``, ``best/name``, ``best/overrides``, ``importance/<param>``, and tables
    ``sweep/jobs`` and ``sweep/param_importances``."""
    import wandb

    node = config.logger.wandb
    offline = wandb_offline(node.get("offline"))
    mode_before = os.environ.get("WANDB_MODE")
    run = wandb.init(
        project=node.get("project"),
        entity=node.get("entity"),
        group=summary["group"],
        name=f"sweep summary {Path(summary['sweep_dir']).name}"[:128],
        job_type="sweep_summary",
        tags=["sweep_summary"],
        dir=str(sweep_dir),
        mode="offline" if offline else "online",
        config={"sweep": {k: summary[k] for k in ("sweep_dir", "metric", "direction", "num_jobs")}},
    )
    try:
        metric = summary["metric"]
        rows = [[j["job"], j["name"], " ".join(j["overrides"]), j["value"]] for j in summary["jobs"]]
        logged = {"sweep/jobs": wandb.Table(columns=["job", "name", "overrides", metric], data=rows)}
        importances = summary.get("param_importances") or {}
        if importances:
            logged["sweep/param_importances"] = wandb.Table(
                columns=["param", "importance"], data=[[k, v] for k, v in importances.items()]
            )
        run.log(logged)
        best = summary["best"]
        if best is not None:
            run.summary.update(
                {
                    "best/value": best["value"],
                    "best/job": best["job"],
                    "best/name": best["name"],
                    "best/overrides": " ".join(best["overrides"]),
                }
            )
        run.summary.update({f"importance/{k}": v for k, v in importances.items()})
        sync_dir = run.settings.sync_dir if offline else None
    finally:
        run.finish()
        restore_wandb_mode(mode_before)
    if sync_dir:
        log.info(f"W&B ran offline; upload the sweep summary with:  wandb sync {sync_dir}")
