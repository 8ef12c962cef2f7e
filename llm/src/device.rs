//! [`Device`]: where the runner's forward executes.

use std::str::FromStr;

use crate::error::LlmError;

/// `cpu` (default) or `cuda:N` (needs the `cuda` feature).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for Device {
    type Err = LlmError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| LlmError::Device(s.into(), "expected `cpu` or `cuda:N`".into())),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Device {
    /// Checks the device can be used: CPU always; CUDA only in a `cuda` build, where the
    /// device is opened through candle. The deterministic forward itself runs on the CPU, so a
    /// CUDA device is refused after the check until a GPU forward lands.
    pub fn check(self) -> Result<(), LlmError> {
        match self {
            Self::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Self::Cuda(n) => {
                candle_core::Device::new_cuda(n)
                    .map_err(|e| LlmError::Device(self.to_string(), e.to_string()))?;
                Err(LlmError::Device(
                    self.to_string(),
                    "the runner's forward is CPU-only for now".into(),
                ))
            }
            #[cfg(not(feature = "cuda"))]
            Self::Cuda(_) => Err(LlmError::Device(
                self.to_string(),
                "this build has no `cuda` feature".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_cuda() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda:1".parse::<Device>().unwrap(), Device::Cuda(1));
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert!("gpu".parse::<Device>().is_err());
        assert!("cuda:x".parse::<Device>().is_err());
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
        assert!(Device::Cpu.check().is_ok());
    }
}
