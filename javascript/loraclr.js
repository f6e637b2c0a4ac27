// sd-webui-loraclr: when a merge finishes, refresh the Lora tabs so the new LoRA shows at once.
(function() {
    var refreshedJobs = new Set();

    onUiUpdate(function() {
        var done = gradioApp().querySelector("#loraclr_status [data-loraclr-done]");
        if (!done) {
            return;
        }
        var job = done.getAttribute("data-loraclr-done");
        if (refreshedJobs.has(job)) {
            return;
        }
        refreshedJobs.add(job);
        gradioApp().querySelectorAll("[id$='_lora_extra_refresh_internal']").forEach(function(button) {
            button.dispatchEvent(new Event("click"));
        });
    });
})();
