"""The hook surface of Ryzen. docs/plugins.md explains each hook with an example.

Implementations may accept any subset of a hook's arguments. Hooks that take
`settings` receive that plugin's own validated settings (or None), `record`
appends an event to the run's optimization_analysis.json, and `context` is the
variant's RunContext (ryzen_core.context). Results are the types of
ryzen_core.results, checked by the host.
"""
import pluggy

hookspec = pluggy.HookspecMarker("ryzen")
hookimpl = pluggy.HookimplMarker("ryzen")


@hookspec
def ryzen_settings():
    """Return the pydantic model class of this plugin's settings (config section named after the plugin)."""


@hookspec
def register_commands(cli):
    """Add click commands to the `ryzen` command group."""


@hookspec
def on_model_load(model, tokenizer, config, settings, record, context):
    """Called once after the model is built and before training; may modify the model in place."""


@hookspec
def transform_forward(forward, model, config, settings, record, context):
    """Return a training forward that wraps `forward`, or None to keep it; folded in --plugins order."""


@hookspec
def on_train_start(model, optimizer, config, settings, record, context):
    """Called after the optimizer is built, before the first step; may adjust both in place."""


@hookspec
def on_epoch_end(epoch, metrics, model, config, settings, record, context):
    """Called after each evaluation; return an Adaptation of the plugin's own settings (the host applies it), or None."""


@hookspec
def on_train_batch_end(step, model, optimizer, metrics, config, settings, record, context):
    """Called after each optimizer step (named as in Lightning); may update the plugin's own state, e.g. an EMA."""


@hookspec
def on_train_finalize(model, config, settings, record, context):
    """Called once when training stops, before the final checkpoint and every artifact; may change weights in place."""


@hookspec
def on_train_end(model, metrics, run_dir, config, settings, record, context):
    """Called once after training with the final metrics; may write files into run_dir; return a ReportSection or None."""


@hookspec
def on_infer(generate, model, tokenizer, config, settings, record, context):
    """Return a generate function (or an InferencePath) that wraps `generate`, or None to keep it; folded in --plugins order."""


@hookspec
def on_export(model, tokenizer, export_dir, config, settings, record, context):
    """Export the trained model into export_dir; return an ExportResult or None."""


@hookspec(firstresult=True)
def load_backend(path):
    """Return an inference backend (ryzen_core.Backend) for the export at `path`, or None if not yours; the first plugin that answers wins."""
