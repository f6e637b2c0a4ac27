"""modules.scripts: the Script base class and a minimal ScriptRunner.

``load_scripts(paths)`` takes script files or folders (the real one takes no argument and
walks the extensions); each file is imported like the real loader does (its extension folder
on ``sys.path`` and as ``basedir()`` during import, ``script_loading.load_module``) and its
``Script`` subclasses are collected. ``ScriptRunner.setup_ui()`` builds the AlwaysVisible
scripts' ``ui(is_img2img)`` inside a gradio Blocks (needs gradio) and assigns
``args_from``/``args_to`` like ``create_script_ui``. Hooks are dispatched to alwayson scripts
with ``*p.script_args[args_from:args_to]`` in the real argument order; exceptions in hooks are
reported (``errors.report``), not raised, like the real runner.
"""
import inspect
import os
import re
import sys
from collections import namedtuple

from modules import shared, paths, script_callbacks, script_loading, errors, util

topological_sort = util.topological_sort

AlwaysVisible = object()


class MaskBlendArgs:
    def __init__(self, current_latent, nmask, init_latent, mask, blended_latent, denoiser=None, sigma=None):
        self.current_latent = current_latent
        self.nmask = nmask
        self.init_latent = init_latent
        self.mask = mask
        self.blended_latent = blended_latent
        self.denoiser = denoiser
        self.is_final_blend = denoiser is None
        self.sigma = sigma


class PostSampleArgs:
    def __init__(self, samples):
        self.samples = samples


class PostprocessImageArgs:
    def __init__(self, image):
        self.image = image


class PostProcessMaskOverlayArgs:
    def __init__(self, index, mask_for_overlay, overlay_image):
        self.index = index
        self.mask_for_overlay = mask_for_overlay
        self.overlay_image = overlay_image


class PostprocessBatchListArgs:
    def __init__(self, images):
        self.images = images


class OnComponent:
    def __init__(self, component):
        self.component = component


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    on_before_component_elem_id = None
    on_after_component_elem_id = None
    setup_for_ui_only = False
    controls = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def after_extra_networks_activate(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch_list(self, p, pp: PostprocessBatchListArgs, *args, **kwargs):
        pass

    def on_mask_blend(self, p, mba: MaskBlendArgs, *args):
        pass

    def post_sample(self, p, ps: PostSampleArgs, *args):
        pass

    def postprocess_image(self, p, pp: PostprocessImageArgs, *args):
        pass

    def postprocess_maskoverlay(self, p, ppmo: PostProcessMaskOverlayArgs, *args):
        pass

    def postprocess_image_after_composite(self, p, pp: PostprocessImageArgs, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def before_component(self, component, **kwargs):
        pass

    def after_component(self, component, **kwargs):
        pass

    def on_before_component(self, callback, *, elem_id):
        if self.on_before_component_elem_id is None:
            self.on_before_component_elem_id = []
        self.on_before_component_elem_id.append((elem_id, callback))

    def on_after_component(self, callback, *, elem_id):
        if self.on_after_component_elem_id is None:
            self.on_after_component_elem_id = []
        self.on_after_component_elem_id.append((elem_id, callback))

    def describe(self):
        return ""

    def elem_id(self, item_id):
        need_tabname = self.show(True) == self.show(False)
        tabkind = 'img2img' if self.is_img2img else 'txt2img'
        tabname = f"{tabkind}_" if need_tabname else ""
        title = re.sub(r'[^a-z_0-9]', '', re.sub(r'\s', '_', self.title().lower()))
        return f'script_{tabname}{title}_{item_id}'

    def before_hr(self, p, *args):
        pass


class ScriptBuiltinUI(Script):
    setup_for_ui_only = True

    def elem_id(self, item_id):
        need_tabname = self.show(True) == self.show(False)
        tabname = ('img2img' if self.is_img2img else 'txt2img') + "_" if need_tabname else ""
        return f'{tabname}{item_id}'

    def show(self, is_img2img):
        return AlwaysVisible


current_basedir = paths.script_path


def basedir():
    """The extension folder of the script being imported (the WebUI root otherwise)."""
    return current_basedir


ScriptFile = namedtuple("ScriptFile", ["basedir", "filename", "path"])
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])

scripts_data = []
postprocessing_scripts_data = []


def _script_files(paths_or_dirs):
    files = []
    for item in paths_or_dirs:
        item = os.path.abspath(item)
        if os.path.isdir(item):
            names = sorted(x for x in os.listdir(item) if x.lower().endswith(".py"))
            files += [os.path.join(item, x) for x in names if os.path.isfile(os.path.join(item, x))]
        else:
            files.append(item)
    result = []
    for path in files:
        folder = os.path.dirname(path)
        base = os.path.dirname(folder) if os.path.basename(folder) == "scripts" else folder
        result.append(ScriptFile(base, os.path.basename(path), path))
    return result


def load_scripts(script_paths=(), *, clear_callbacks=True):
    """Import script files (harness: give files or ``scripts`` folders) and make the runners.

    Like the real one: callbacks are cleared first, each file's extension folder is put first
    on sys.path and returned by basedir() while it is imported, import errors are reported.
    """
    global current_basedir, scripts_txt2img, scripts_img2img
    scripts_data.clear()
    postprocessing_scripts_data.clear()
    if clear_callbacks:
        script_callbacks.clear_callbacks()

    syspath = sys.path
    for scriptfile in _script_files(script_paths):
        try:
            if scriptfile.basedir != paths.script_path:
                sys.path = [scriptfile.basedir] + sys.path
            current_basedir = scriptfile.basedir
            module = script_loading.load_module(scriptfile.path)
            for script_class in module.__dict__.values():
                if inspect.isclass(script_class) and issubclass(script_class, Script):
                    scripts_data.append(ScriptClassData(script_class, scriptfile.path, scriptfile.basedir, module))
        except Exception:
            errors.report(f"Error loading script: {scriptfile.filename}", exc_info=True)
        finally:
            sys.path = syspath
            current_basedir = paths.script_path

    scripts_txt2img = ScriptRunner()
    scripts_img2img = ScriptRunner()


def wrap_call(func, filename, funcname, *args, default=None, **kwargs):
    try:
        return func(*args, **kwargs)
    except Exception:
        errors.report(f"Error calling: {filename}/{funcname}", exc_info=True)
    return default


class ScriptRunner:
    def __init__(self):
        self.scripts = []
        self.selectable_scripts = []
        self.alwayson_scripts = []
        self.titles = []
        self.title_map = {}
        self.infotext_fields = []
        self.paste_field_names = []
        self.inputs = [None]
        self.callback_map = {}
        self.on_before_component_elem_id = {}
        self.on_after_component_elem_id = {}

    def initialize_scripts(self, is_img2img):
        self.scripts.clear()
        self.alwayson_scripts.clear()
        self.selectable_scripts.clear()

        for script_data in scripts_data:
            try:
                script = script_data.script_class()
            except Exception:
                errors.report(f"Error # failed to initialize Script {script_data.module}: ", exc_info=True)
                continue

            script.filename = script_data.path
            script.is_txt2img = not is_img2img
            script.is_img2img = is_img2img
            script.tabname = "img2img" if is_img2img else "txt2img"

            visibility = script.show(script.is_img2img)
            if visibility == AlwaysVisible:
                self.scripts.append(script)
                self.alwayson_scripts.append(script)
                script.alwayson = True
            elif visibility:
                self.scripts.append(script)
                self.selectable_scripts.append(script)

        self.callback_map.clear()

    def create_script_ui(self, script):
        script.args_from = len(self.inputs)
        script.args_to = len(self.inputs)
        try:
            self.create_script_ui_inner(script)
        except Exception:
            errors.report(f"Error creating UI for {script.name}: ", exc_info=True)

    def create_script_ui_inner(self, script):
        controls = wrap_call(script.ui, script.filename, "ui", script.is_img2img)
        script.controls = controls
        if controls is None:
            return
        script.name = wrap_call(script.title, script.filename, "title", default=script.filename).lower()
        for control in controls:
            control.custom_script_source = os.path.basename(script.filename)
        if script.infotext_fields is not None:
            self.infotext_fields += script.infotext_fields
        if script.paste_field_names is not None:
            self.paste_field_names += script.paste_field_names
        self.inputs += controls
        script.args_to = len(self.inputs)

    def setup_ui_for_section(self, section, scriptlist=None):
        import gradio as gr

        if scriptlist is None:
            scriptlist = self.alwayson_scripts
        for script in scriptlist:
            if script.alwayson and script.section != section:
                continue
            if script.create_group:
                with gr.Group(visible=script.alwayson) as group:
                    self.create_script_ui(script)
                script.group = group
            else:
                self.create_script_ui(script)

    def prepare_ui(self):
        self.inputs = [None]

    def setup_ui(self):
        """Harness: build every AlwaysVisible script's UI (all sections, in script order) and
        return ``self.inputs``; call inside a ``gr.Blocks()`` context. Selectable scripts get
        no UI (``inputs[0]`` stays None: "no script selected")."""
        import gradio as gr

        all_titles = [wrap_call(script.title, script.filename, "title") or script.filename for script in self.scripts]
        self.title_map = {title.lower(): script for title, script in zip(all_titles, self.scripts)}
        self.titles = [wrap_call(script.title, script.filename, "title") or f"{script.filename} [error]" for script in self.selectable_scripts]
        for script in self.alwayson_scripts:
            if script.create_group:
                with gr.Group(visible=True) as group:
                    self.create_script_ui(script)
                script.group = group
            else:
                self.create_script_ui(script)
        return self.inputs

    def run(self, p, *args):
        script_index = args[0] if args else None
        if script_index == 0 or script_index is None:
            return None
        script = self.selectable_scripts[script_index - 1]
        script_args = args[script.args_from:script.args_to]
        return script.run(p, *script_args)

    def list_scripts_for_method(self, method_name):
        if method_name in ('before_component', 'after_component'):
            return self.scripts
        return self.alwayson_scripts

    def create_ordered_callbacks_list(self, method_name, *, enable_user_sort=True):
        script_list = self.list_scripts_for_method(method_name)
        category = f'script_{method_name}'
        callbacks = []
        for script in script_list:
            if getattr(script.__class__, method_name, None) == getattr(Script, method_name, None):
                continue
            script_callbacks.add_callback(callbacks, script, category=category, name=script.__class__.__name__, filename=script.filename)
        return script_callbacks.sort_callbacks(category, callbacks, enable_user_sort=enable_user_sort)

    def ordered_callbacks(self, method_name, *, enable_user_sort=True):
        script_list = self.list_scripts_for_method(method_name)
        category = f'script_{method_name}'
        scrpts_len, callbacks = self.callback_map.get(category, (-1, None))
        if callbacks is None or scrpts_len != len(script_list):
            callbacks = self.create_ordered_callbacks_list(method_name, enable_user_sort=enable_user_sort)
            self.callback_map[category] = len(script_list), callbacks
        return callbacks

    def ordered_scripts(self, method_name):
        return [x.callback for x in self.ordered_callbacks(method_name)]

    def _each(self, method_name, p, call):
        for script in self.ordered_scripts(method_name):
            try:
                call(script, p.script_args[script.args_from:script.args_to])
            except Exception:
                errors.report(f"Error running {method_name}: {script.filename}", exc_info=True)

    def before_process(self, p):
        self._each('before_process', p, lambda s, a: s.before_process(p, *a))

    def process(self, p):
        self._each('process', p, lambda s, a: s.process(p, *a))

    def process_before_every_sampling(self, p, **kwargs):
        self._each('process_before_every_sampling', p, lambda s, a: s.process_before_every_sampling(p, *a, **kwargs))

    def before_process_batch(self, p, **kwargs):
        self._each('before_process_batch', p, lambda s, a: s.before_process_batch(p, *a, **kwargs))

    def after_extra_networks_activate(self, p, **kwargs):
        self._each('after_extra_networks_activate', p, lambda s, a: s.after_extra_networks_activate(p, *a, **kwargs))

    def process_batch(self, p, **kwargs):
        self._each('process_batch', p, lambda s, a: s.process_batch(p, *a, **kwargs))

    def postprocess(self, p, processed):
        self._each('postprocess', p, lambda s, a: s.postprocess(p, processed, *a))

    def postprocess_batch(self, p, images, **kwargs):
        self._each('postprocess_batch', p, lambda s, a: s.postprocess_batch(p, *a, images=images, **kwargs))

    def postprocess_batch_list(self, p, pp: PostprocessBatchListArgs, **kwargs):
        self._each('postprocess_batch_list', p, lambda s, a: s.postprocess_batch_list(p, pp, *a, **kwargs))

    def post_sample(self, p, ps: PostSampleArgs):
        self._each('post_sample', p, lambda s, a: s.post_sample(p, ps, *a))

    def on_mask_blend(self, p, mba: MaskBlendArgs):
        self._each('on_mask_blend', p, lambda s, a: s.on_mask_blend(p, mba, *a))

    def postprocess_image(self, p, pp: PostprocessImageArgs):
        self._each('postprocess_image', p, lambda s, a: s.postprocess_image(p, pp, *a))

    def postprocess_maskoverlay(self, p, ppmo: PostProcessMaskOverlayArgs):
        self._each('postprocess_maskoverlay', p, lambda s, a: s.postprocess_maskoverlay(p, ppmo, *a))

    def postprocess_image_after_composite(self, p, pp: PostprocessImageArgs):
        self._each('postprocess_image_after_composite', p, lambda s, a: s.postprocess_image_after_composite(p, pp, *a))

    def before_hr(self, p):
        self._each('before_hr', p, lambda s, a: s.before_hr(p, *a))

    def setup_scrips(self, p, *, is_ui=True):
        for script in self.ordered_scripts('setup'):
            if not is_ui and script.setup_for_ui_only:
                continue
            try:
                script.setup(p, *p.script_args[script.args_from:script.args_to])
            except Exception:
                errors.report(f"Error running setup: {script.filename}", exc_info=True)

    def before_component(self, component, **kwargs):
        for script in self.ordered_scripts('before_component'):
            try:
                script.before_component(component, **kwargs)
            except Exception:
                errors.report(f"Error running before_component: {script.filename}", exc_info=True)

    def after_component(self, component, **kwargs):
        for script in self.ordered_scripts('after_component'):
            try:
                script.after_component(component, **kwargs)
            except Exception:
                errors.report(f"Error running after_component: {script.filename}", exc_info=True)

    def script(self, title):
        return self.title_map.get(title.lower())

    def set_named_arg(self, args, script_name, arg_elem_id, value, fuzzy=False):
        script = next((x for x in self.scripts if x.name == script_name), None)
        if script is None:
            raise RuntimeError(f"script {script_name} not found")
        for i, control in enumerate(script.controls):
            if arg_elem_id in control.elem_id if fuzzy else arg_elem_id == control.elem_id:
                index = script.args_from + i
                if isinstance(args, tuple):
                    return args[:index] + (value,) + args[index + 1:]
                elif isinstance(args, list):
                    args[index] = value
                    return args
                raise RuntimeError(f"args is not a list or tuple, but {type(args)}")
        raise RuntimeError(f"arg_elem_id {arg_elem_id} not found in script {script_name}")


scripts_txt2img: ScriptRunner = None
scripts_img2img: ScriptRunner = None
scripts_postproc = None
scripts_current: ScriptRunner = None

reload_scripts = load_scripts
