class Timer:
    def record(self, category, extra_time=0, disable_log=False):
        pass

    def summary(self):
        return ""


startup_timer = Timer()
