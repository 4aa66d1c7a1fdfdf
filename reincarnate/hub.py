"""Sharing a student on the Hugging Face Hub (``--upload-model``, ``python teacher_utils.py upload``): the repo name of
a run (:func:`hub_repo_name`), the login check before a run starts (:func:`check_hub_login`), the model card, and
one line for whatever the Hub refuses.  The upload itself (``upload_hf``) loads the run as a teacher first, so it
stays with the teacher loader in ``teacher_utils.py``."""

from __future__ import annotations

from typing import Any, Mapping

from reincarnate.envs import game_from_env_id
from reincarnate.errors import HubError, _one_line


def hub_repo_name(run_args: Mapping) -> str:
    """The Hub repo name of a run: CleanRL's ``{env_id}-{exp_name}-seed{seed}`` with the method added, so that the
    paper's comparisons on one game and seed do not overwrite each other."""
    return f"{run_args['env_id']}-{run_args['exp_name']}-{run_args.get('method', 'qdagger')}-seed{run_args['seed']}"


def _hub_api() -> Any:
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise HubError("uploading to the Hub needs huggingface_hub: pip install huggingface_hub") from None
    return HfApi()


def _hub_failure(e: Exception, doing: str, retry: str) -> HubError:
    """One line for an exception of huggingface_hub or of its HTTP client while ``doing``; ``retry`` says how to go on."""
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(e, "response", None), "status_code", None) if isinstance(e, HfHubHTTPError) else None
    if status == 401:
        return HubError(f"{doing}: the Hub refused the Hugging Face token (HTTP 401: invalid or expired); log in again with `hf auth login` "
                        f"(or set HF_TOKEN), then {retry}")
    if status == 403:
        return HubError(f"{doing}: the token may not write there (HTTP 403); use a token with write access, or pass --hf-entity "
                        f"with a namespace you can write to, then {retry}")
    if status is not None:
        return HubError(f"{doing}: the Hub answered HTTP {status} ({_one_line(e)}); {retry}")
    if isinstance(e, OSError) or any(w in type(e).__name__ for w in ("Connect", "Timeout", "Network")):
        return HubError(f"{doing}: the Hub cannot be reached ({type(e).__name__}: {_one_line(e)}); check the network (HF_ENDPOINT), then {retry}")
    cause = e.__cause__ or e.__context__  # huggingface_hub wraps a failed file transfer in a RuntimeError
    detail = f"{_one_line(e)}" + (f" <- {type(cause).__name__}: {_one_line(cause)}" if cause is not None else "")
    return HubError(f"{doing} failed ({type(e).__name__}: {detail}); {retry}")


def check_hub_login(entity: str = "") -> str:
    """The Hub namespace an upload will go to: ``entity``, else the logged-in user.  Run before a training run
    starts, so that a missing or refused login is told then rather than after the run: a token must be configured
    (``hf auth login`` or HF_TOKEN), the Hub must accept it, and ``entity`` must be the user or one of its orgs."""
    api = _hub_api()
    from huggingface_hub import get_token

    if not get_token():
        raise HubError("--upload-model needs a Hugging Face login: run `hf auth login` (or set HF_TOKEN), or drop --upload-model")
    retry = "run again, or drop --upload-model and upload the finished run with `python teacher_utils.py upload runs/<run_name>`"
    try:
        me = api.whoami()
    except Exception as e:  # noqa: BLE001 - huggingface_hub and its HTTP client raise many kinds; the user needs one line
        raise _hub_failure(e, "checking the Hugging Face login", retry) from None
    namespaces = [me["name"], *(o["name"] for o in me.get("orgs", []) if isinstance(o, Mapping) and "name" in o)]
    if entity and entity not in namespaces:
        raise HubError(f"--hf-entity {entity}: the logged-in user {me['name']} can upload to {', '.join(namespaces)} only; "
                       f"pass one of those, or log in as a member of {entity}")
    return entity or me["name"]


def _model_card(run_args: Mapping, final: Mapping | None, repo_id: str, model_name: str, script: str) -> str:
    """README.md of an uploaded student: the Hub's metadata (tags, the final evaluation as model-index) and how to
    use it as a teacher, watch it and train it again."""
    from huggingface_hub import EvalResult, ModelCardData

    env_id, method, seed = run_args["env_id"], run_args.get("method", "qdagger"), run_args["seed"]
    algo = "Rainbow" if script == "qdagger_rainbow_atari_jax" else "DQN"
    title = f"{method} {algo} student on {env_id}"
    results = []
    if final and final.get("returns"):
        results = [EvalResult(task_type="reinforcement-learning", task_name="reinforcement-learning", dataset_type=env_id,
                              dataset_name=env_id, metric_type="mean_reward", metric_name="mean_reward",
                              metric_value=f"{final['mean']:.2f} +/- {final['std']:.2f}")]
    data = ModelCardData(library_name="reincarnate", tags=[env_id, "reinforcement-learning", "deep-reinforcement-learning",
                                                           "reincarnating-rl", method, "custom-implementation"],
                         model_name=title if results else None, eval_results=results or None)
    teacher = f"`{run_args['teacher_checkpoint']}`" if run_args.get("teacher_checkpoint") else f"`gs://rl_checkpoints/DQN_400/{game_from_env_id(env_id)}/1` (the default)"
    lines = [f"# {title}", "",
             f"A {algo} agent (`{run_args.get('network', 'nature')}` network) trained on `{env_id}` by `{script}.py` of reincarnate, "
             f"Reincarnating RL (Agarwal et al., NeurIPS 2022): method `{method}`, seed {seed}"
             + ("" if method == "tabula-rasa" else f", teacher {teacher}") + ".", ""]
    if final and final.get("returns"):
        lines += ["| final evaluation | |", "|---|---|",
                  f"| episodes | {len(final['returns'])} |",
                  f"| mean return | {final['mean']:.2f} ± {final['std']:.2f} |"]
        for key, label in (("teacher_normalized_score", "teacher-normalized score"), ("human_normalized_score", "human-normalized score"),
                           ("agent_steps", "online agent steps")):
            if final.get(key) is not None:
                value = final[key]
                lines.append(f"| {label} | {value:.3f} |" if isinstance(value, float) else f"| {label} | {value} |")
        lines.append("")
    address = f"hf://{repo_id}/{model_name}"
    lines += ["## Use it", "", "As the teacher of a new student:", "", "```bash",
              f"python {script}.py --env-id {env_id} --teacher-checkpoint {address}", "```", "",
              "Watch and score it (Dopamine's evaluation protocol; `--capture-video` films its first episode):", "", "```bash",
              f"python reincarnate_utils/enjoy.py {address} --env-id {env_id}", "```", "",
              "The files: the params (flax msgpack), `args.json` (every flag of the run: the network is rebuilt from it), "
              "`q_probe.npz` (Q-values of a few states, checked at every load), `final_eval.json`, the TensorBoard logs, "
              "the code that trained it, and the final evaluation's video when it was filmed.", "",
              "## Train it again", "", "```bash", (final or {}).get("command") or f"python {script}.py --env-id {env_id} --seed {seed}", "```", "",
              "| flag | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in run_args.items()]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
