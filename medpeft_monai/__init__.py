"""medpeft_monai."""
