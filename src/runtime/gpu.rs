//! What the GPU stack is: the CUDA driver, the devices it sees, and the TensorRT library.
//!
//! Read straight from `libcuda.so.1` and `libnvinfer.so` (loaded at run time, so the binary
//! needs neither to start). The TensorRT engine cache is keyed by these facts, and
//! `edgeadapt doctor` prints them.

use std::ffi::{CStr, c_char, c_int, c_uint};

use serde::{Deserialize, Serialize};

/// One CUDA device as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaDevice {
    pub ordinal: i32,
    pub name: String,
    /// Compute capability, e.g. `8.7` for Jetson Orin, `9.0` for H100.
    pub compute_capability: String,
    pub memory_mib: u64,
}

/// The CUDA driver and its devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaDriver {
    /// The newest CUDA version the driver supports, e.g. `12.6`.
    pub cuda_version: String,
    pub devices: Vec<CudaDevice>,
}

const CUDA_LIBRARIES: &[&str] = &["libcuda.so.1", "libcuda.so"];
const TENSORRT_LIBRARIES: &[&str] = &["libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"];
const ATTRIBUTE_CC_MAJOR: c_int = 75;
const ATTRIBUTE_CC_MINOR: c_int = 76;

/// Asks the CUDA driver for its version and devices.
pub fn cuda_driver() -> Result<CudaDriver, String> {
    let library = open_first(CUDA_LIBRARIES).map_err(|tried| format!("no CUDA driver ({tried})"))?;
    type Init = unsafe extern "C" fn(c_uint) -> c_int;
    type IntOut = unsafe extern "C" fn(*mut c_int) -> c_int;
    type DeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
    type DeviceName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
    type DeviceAttribute = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;
    type DeviceMemory = unsafe extern "C" fn(*mut usize, c_int) -> c_int;
    // SAFETY: the signatures are those of the CUDA driver API (cuda.h), stable since CUDA 4;
    // every out-pointer points at a live local of the declared type.
    unsafe {
        let symbol = |name: &[u8]| -> Result<*const (), String> {
            library
                .get::<*const ()>(name)
                .map(|s| *s)
                .map_err(|e| format!("CUDA driver lacks {}: {e}", String::from_utf8_lossy(name)))
        };
        let init: Init = std::mem::transmute(symbol(b"cuInit\0")?);
        let driver_version: IntOut = std::mem::transmute(symbol(b"cuDriverGetVersion\0")?);
        let device_count: IntOut = std::mem::transmute(symbol(b"cuDeviceGetCount\0")?);
        let device_get: DeviceGet = std::mem::transmute(symbol(b"cuDeviceGet\0")?);
        let device_name: DeviceName = std::mem::transmute(symbol(b"cuDeviceGetName\0")?);
        let attribute: DeviceAttribute = std::mem::transmute(symbol(b"cuDeviceGetAttribute\0")?);
        let total_memory: DeviceMemory = std::mem::transmute(symbol(b"cuDeviceTotalMem_v2\0")?);
        let check =
            |code: c_int, what: &str| if code == 0 { Ok(()) } else { Err(format!("{what} failed (CUresult {code})")) };

        let mut version = 0;
        check(driver_version(&mut version), "cuDriverGetVersion")?;
        check(init(0), "cuInit")?;
        let mut count = 0;
        check(device_count(&mut count), "cuDeviceGetCount")?;
        let mut devices = Vec::new();
        for ordinal in 0..count {
            let mut device = 0;
            check(device_get(&mut device, ordinal), "cuDeviceGet")?;
            let mut name = [0 as c_char; 256];
            check(device_name(name.as_mut_ptr(), name.len() as c_int, device), "cuDeviceGetName")?;
            let (mut major, mut minor) = (0, 0);
            check(attribute(&mut major, ATTRIBUTE_CC_MAJOR, device), "cuDeviceGetAttribute")?;
            check(attribute(&mut minor, ATTRIBUTE_CC_MINOR, device), "cuDeviceGetAttribute")?;
            let mut bytes = 0usize;
            check(total_memory(&mut bytes, device), "cuDeviceTotalMem")?;
            devices.push(CudaDevice {
                ordinal,
                name: CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned(),
                compute_capability: format!("{major}.{minor}"),
                memory_mib: bytes as u64 / (1 << 20),
            });
        }
        Ok(CudaDriver { cuda_version: cuda_version_name(version), devices })
    }
}

/// The TensorRT library's version, e.g. `10.3.0`.
pub fn tensorrt_version() -> Result<String, String> {
    let library = open_first(TENSORRT_LIBRARIES).map_err(|tried| format!("no TensorRT library ({tried})"))?;
    // SAFETY: `getInferLibVersion` is TensorRT's C entry point `int32_t getInferLibVersion()`.
    unsafe {
        let version = library
            .get::<unsafe extern "C" fn() -> i32>(b"getInferLibVersion\0")
            .map_err(|e| format!("TensorRT library lacks getInferLibVersion: {e}"))?;
        Ok(tensorrt_version_name(version()))
    }
}

fn open_first(names: &[&str]) -> Result<libloading::Library, String> {
    let mut problems = Vec::new();
    for name in names {
        // SAFETY: loading runs the library's initialisers; these are NVIDIA's system libraries.
        match unsafe { libloading::Library::new(*name) } {
            Ok(library) => return Ok(library),
            Err(error) => problems.push(format!("{name}: {error}")),
        }
    }
    Err(problems.join("; "))
}

/// `12060` to `12.6` (the driver API's encoding: 1000 × major + 10 × minor).
fn cuda_version_name(code: c_int) -> String {
    format!("{}.{}", code / 1000, (code % 1000) / 10)
}

/// TensorRT 10 encodes 10000 × major + 100 × minor + patch; TensorRT 8 used 1000 × major.
fn tensorrt_version_name(code: i32) -> String {
    if code >= 100_000 {
        format!("{}.{}.{}", code / 10000, (code / 100) % 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, (code / 100) % 10, code % 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes_decode_as_nvidia_documents_them() {
        assert_eq!(cuda_version_name(12060), "12.6");
        assert_eq!(cuda_version_name(13000), "13.0");
        assert_eq!(tensorrt_version_name(100300), "10.3.0");
        assert_eq!(tensorrt_version_name(101302), "10.13.2");
        assert_eq!(tensorrt_version_name(8602), "8.6.2");
    }

    #[test]
    fn a_missing_library_is_an_error_that_names_it() {
        let error = open_first(&["libedgeadapt-no-such-library.so"]).err().unwrap();
        assert!(error.contains("libedgeadapt-no-such-library.so"), "{error}");
    }
}
