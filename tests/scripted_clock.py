"""A stand-in for training.step_cost.timed whose seconds come from a script, so reports can be pinned exactly."""


class ScriptedClock:
    """timed(fn, device) returns the scripted seconds of what fn is: label_of(fn) names it, seconds[label] is a
    constant or a list used up call by call. Each fn really runs once (its first call, as a warm-up would), so
    the code under test still runs its real steps."""

    def __init__(self, seconds, label_of):
        self.seconds, self.label_of = seconds, label_of
        self.ran = set()  # the functions themselves: holding them keeps ids from being reused

    def timed(self, fn, device):
        if fn not in self.ran:
            fn()
            self.ran.add(fn)
        script = self.seconds[self.label_of(fn)]
        return script.pop(0) if isinstance(script, list) else script
