"""Start the ppsf-trainer UI: python launch.py [--port 7860] [--listen --auth user:password] [--share].

Listens on 127.0.0.1 by default. Reaching it from other machines (--listen, --share) requires a login,
given as --auth user:password or the PPSF_AUTH environment variable; without one it refuses to start.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no phoning home

LOCAL_HOST = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"
DEFAULT_PORT = 7860
AUTH_ENV = "PPSF_AUTH"


class LaunchError(ValueError):
    """Arguments the UI refuses to start with; the message says what to change."""


@dataclass(frozen=True)
class LaunchSettings:
    """How to serve the UI, parsed and checked."""

    host: str = LOCAL_HOST
    port: int = DEFAULT_PORT
    share: bool = False
    auth: tuple[str, str] | None = None
    runs_dir: Path = Path("runs")
    configs_dir: Path | None = None  # None: configs/ beside the runs folder
    presets_dir: Path | None = None
    allow_parallel_runs: bool = False
    open_browser: bool = False


def parse_auth(text: str) -> tuple[str, str]:
    """ "user:password" -> (user, password); the password may contain ":". Raises LaunchError."""
    user, sep, password = text.partition(":")
    if not sep or not user.strip() or not password:
        raise LaunchError("--auth (or PPSF_AUTH) must look like user:password, both non-empty")
    return user.strip(), password


def argument_parser() -> argparse.ArgumentParser:
    """The command line of launch.py."""
    parser = argparse.ArgumentParser(prog="python launch.py", description="ppsf-trainer UI (Gradio)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})"
    )
    parser.add_argument("--listen", action="store_true", help=f"listen on {ALL_INTERFACES} (needs --auth)")
    parser.add_argument(
        "--share", action="store_true", help="also open a public gradio.live link (needs --auth)"
    )
    parser.add_argument("--auth", metavar="USER:PASSWORD", help=f"require this login (or set {AUTH_ENV})")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where runs live (default: runs)")
    parser.add_argument(
        "--configs-dir",
        type=Path,
        default=None,
        help="the only folder the UI saves config files to and loads them from (default: configs/ beside "
        "the runs folder)",
    )
    parser.add_argument(
        "--presets-dir", type=Path, default=None, help="preset TOML files (default: presets/)"
    )
    parser.add_argument(
        "--allow-parallel-runs", action="store_true", help="allow starting a run while another one trains"
    )
    parser.add_argument("--inbrowser", action="store_true", help="open the UI in the default browser")
    return parser


def settings_from_args(argv: list[str] | None = None, env: dict[str, str] | None = None) -> LaunchSettings:
    """Parse and check the command line (and PPSF_AUTH from `env`); raises LaunchError on unsafe settings."""
    args = argument_parser().parse_args(argv)
    env = os.environ if env is None else env
    auth_text = args.auth if args.auth is not None else env.get(AUTH_ENV, "")
    auth = parse_auth(auth_text) if auth_text else None
    if not 0 < args.port < 65536:
        raise LaunchError(f"--port must be between 1 and 65535, got {args.port}")
    for flag, wanted in (("--listen", args.listen), ("--share", args.share)):
        if wanted and auth is None:
            raise LaunchError(
                f"{flag} makes the UI reachable from other machines, so it needs a login: "
                f"add --auth user:password (or set {AUTH_ENV}=user:password)"
            )
    return LaunchSettings(
        host=ALL_INTERFACES if args.listen else LOCAL_HOST,
        port=args.port,
        share=args.share,
        auth=auth,
        runs_dir=args.runs_dir,
        configs_dir=args.configs_dir,
        presets_dir=args.presets_dir,
        allow_parallel_runs=args.allow_parallel_runs,
        open_browser=args.inbrowser,
    )


# Gradio serves these without a login even under auth. Given a session's hash they cancel its running
# events (/cancel), or end its events and discard its state (a heartbeat opened and closed); /reset is a
# no-op today. The page sends its login cookie with all three, so requiring the login costs it nothing.
SESSION_CONTROL_ROUTES = ("/gradio_api/cancel", "/gradio_api/reset")
HEARTBEAT_ROUTE = "/gradio_api/heartbeat/"


class SessionGuard:
    """ASGI middleware for logins: the session-control routes answer 401 without a valid login cookie, and
    /logout ends only the login of the browser that asks (Gradio's default ends every login of that user,
    so a second browser's page would be left broken)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        gradio_app = scope.get("app")  # Starlette puts the application here before any middleware
        if scope["type"] != "http" or gradio_app is None:
            await self.app(scope, receive, send)
            return
        if scope.get("path", "").rstrip("/").endswith("/logout"):
            scope = _logout_this_browser_only(gradio_app, scope)
        if _is_session_control(scope.get("path", "")) and not await _logged_in(gradio_app, scope):
            from starlette.responses import JSONResponse

            response = JSONResponse({"error": "Not authenticated"}, status_code=401)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _login_token(gradio_app, scope) -> str | None:
    from starlette.requests import Request

    cookies = Request(scope).cookies
    cookie_id = gradio_app.cookie_id
    return cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")


def _logout_this_browser_only(gradio_app, scope) -> dict:
    """The /logout request with all_session=false, this browser's token already ended.

    Gradio then ends only the token of its secure cookie, which a browser on plain http (--listen) never
    stores, so the token of either cookie is ended here.
    """
    gradio_app.tokens.pop(_login_token(gradio_app, scope), None)
    query = [(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode()) if k != "all_session"]
    return {**scope, "query_string": urlencode([*query, ("all_session", "false")]).encode()}


def _is_session_control(path: str) -> bool:
    return path.rstrip("/").endswith(SESSION_CONTROL_ROUTES) or HEARTBEAT_ROUTE in path


async def _logged_in(gradio_app, scope) -> bool:
    """Whether the request carries a login Gradio accepts (always true when the UI has no auth)."""
    import inspect

    from starlette.requests import Request

    if gradio_app.auth is None and gradio_app.auth_dependency is None:
        return True
    if gradio_app.auth_dependency is not None:
        user = gradio_app.auth_dependency(Request(scope))
        return (await user if inspect.isawaitable(user) else user) is not None
    return gradio_app.tokens.get(_login_token(gradio_app, scope)) is not None


# Under a login, a page whose login ended (logged out in another tab of the browser, or the UI restarted)
# says so and reloads to the login form, instead of answering "Error" to every button.
LOGIN_WATCH_SECONDS = 5
LOGIN_WATCH_JS = f"""() => {{
  const check = async () => {{
    let answer;
    try {{ answer = await fetch("gradio_api/login_check", {{cache: "no-store"}}); }}
    catch (e) {{ return; }}  // the UI is not reachable (restarting): Gradio says so itself
    if (answer.status !== 401 || document.getElementById("ppsf-logged-out")) return;
    const note = document.createElement("div");
    note.id = "ppsf-logged-out";
    note.setAttribute("role", "alert");
    note.textContent = "You were logged out (here or in another tab, or the UI restarted). " +
      "Reloading to the login page…";
    note.style.cssText = "position:fixed;top:0;left:0;right:0;z-index:10000;padding:1em;" +
      "background:#b91c1c;color:white;font-weight:bold;text-align:center";
    document.body.appendChild(note);
    setTimeout(() => window.location.reload(), 3000);
  }};
  setInterval(check, {LOGIN_WATCH_SECONDS * 1000});
}}"""


def launch(settings: LaunchSettings, block: bool = True):
    """Build and serve the UI; with block=False return the running gr.Blocks at once (tests close it)."""
    from starlette.middleware import Middleware

    from app.ui import CSS, PRESETS_DIR, THEME, build_ui
    from trainers.paths import demo_root

    demo = build_ui(
        runs_dir=settings.runs_dir,
        presets_dir=settings.presets_dir or PRESETS_DIR,
        allow_parallel_runs=settings.allow_parallel_runs,
        configs_dir=settings.configs_dir,
    )
    demo.queue()
    _poll_queue_gently(demo)
    demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=settings.share,
        auth=settings.auth,
        inbrowser=settings.open_browser,
        prevent_thread_lock=not block,
        # sample images and exported files are served from these folders only
        allowed_paths=[str(Path(settings.runs_dir).expanduser().resolve()), str(demo_root())],
        theme=THEME,
        css=CSS,
        ssr_mode=False,
        show_error=True,
        app_kwargs={"middleware": [Middleware(SessionGuard)]},
        head=f"<script>({LOGIN_WATCH_JS})();</script>" if settings.auth else None,
        quiet=True,  # Gradio's own hints name launch(share=True); ours below name this script's flags
    )
    print(startup_lines(settings, demo.local_url), flush=True)
    return demo


def startup_lines(settings: LaunchSettings, local_url: str) -> str:
    """Where the UI is, and how to reach it from elsewhere with this script's flags."""
    lines = [f"ppsf-trainer UI: {local_url}"]
    if not settings.share and settings.host == LOCAL_HOST:
        lines.append(
            "Other machines: python launch.py --listen --auth user:password "
            "(or --share --auth user:password for a public gradio.live link)."
        )
    return "\n".join(lines)


# Gradio's queue polls for work every 1 ms (10 ms for progress) off Windows, which costs ~4.5 s of CPU a minute
# with no page open; its Windows intervals cost ~0.7 s and add at most 50 ms to a click.
QUEUE_IDLE_POLL_SECONDS = {"sleep_when_free": 0.05, "progress_update_sleep_when_free": 0.1}


def _poll_queue_gently(demo) -> None:
    for name, seconds in QUEUE_IDLE_POLL_SECONDS.items():
        setattr(demo._queue, name, seconds)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for refused settings)."""
    try:
        settings = settings_from_args(argv)
    except LaunchError as error:
        print(f"launch.py: error: {error}", file=sys.stderr)
        return 2
    launch(settings, block=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
