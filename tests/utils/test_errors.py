"""utils/errors.py: one-line user errors, also when a DataLoader worker raised them."""
import pytest
from torch.utils.data import DataLoader

from utils.errors import UserError, exit_on_user_error, one_line


class Broken:
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise UserError("cannot decode image /data/x.jpg (truncated)\nsecond line")


# slow: the DataLoader iterator left by the raised error takes 5 s to shut its worker down (its join timeout)
@pytest.mark.slow
def test_worker_errors_become_one_line():
    with pytest.raises(UserError) as caught:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert "Original Traceback" in str(caught.value)
    assert one_line(str(caught.value)) == "cannot decode image /data/x.jpg (truncated) second line"


def test_exit_on_user_error(capsys):
    @exit_on_user_error
    def main():
        raise UserError("missing thing\nwith detail")

    with pytest.raises(SystemExit) as code:
        main()
    assert code.value.code == 2
    assert capsys.readouterr().err == "error: missing thing with detail\n"
