//! Saving result files (`--download DIR`): each task's files as soon as it succeeds, since
//! Kling's result URLs expire after 30 days.
//!
//! Files go to `DIR/{job id}/{index}.{ext}`. A file is written to `… .part` and renamed when
//! complete, so a file that exists is whole: a resumed run skips it and fetches only what is
//! missing.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::BodyExt as _;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::Connect;
use tokio::io::AsyncWriteExt as _;

use crate::error::DownloadError;

/// The file name of result `index` of `url`: the index and the URL's extension.
pub fn file_name(index: usize, url: &str) -> String {
    let path = url
        .parse::<Uri>()
        .map(|u| u.path().to_owned())
        .unwrap_or_default();
    let ext = Path::new(&path)
        .extension()
        .and_then(|e| e.to_str())
        .filter(|e| !e.is_empty() && e.len() <= 8 && e.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or("bin");
    format!("{index}.{ext}")
}

/// A job id as a directory name: letters, digits, `-`, `_` and `.` kept, the rest `_`.
pub fn dir_name(job_id: &str) -> String {
    let name: String = job_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.chars().all(|c| c == '.') {
        format!("job{name}")
    } else {
        name
    }
}

/// Downloads every URL of a job that is not on disk yet; returns all the files' paths.
pub async fn fetch_all<C, B>(
    client: &Client<C, B>,
    dir: &Path,
    job_id: &str,
    urls: &[String],
) -> Result<Vec<String>, DownloadError>
where
    C: Connect + Clone + Send + Sync + 'static,
    B: http_body::Body<Data = Bytes> + From<Bytes> + Send + 'static + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let job_dir = dir.join(dir_name(job_id));
    tokio::fs::create_dir_all(&job_dir)
        .await
        .map_err(|e| DownloadError::new(job_dir.display().to_string(), e))?;
    let mut files = Vec::with_capacity(urls.len());
    for (index, url) in urls.iter().enumerate() {
        let path = job_dir.join(file_name(index, url));
        if tokio::fs::metadata(&path).await.is_err() {
            fetch(client, url, &path).await?;
        }
        files.push(path.display().to_string());
    }
    Ok(files)
}

async fn fetch<C, B>(client: &Client<C, B>, url: &str, path: &PathBuf) -> Result<(), DownloadError>
where
    C: Connect + Clone + Send + Sync + 'static,
    B: http_body::Body<Data = Bytes> + From<Bytes> + Send + 'static + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let fail = |e: Box<dyn std::error::Error + Send + Sync>| DownloadError::new(url.to_owned(), e);
    let request = Request::get(url)
        .body(B::from(Bytes::new()))
        .map_err(|e| fail(e.into()))?;
    let response = client.request(request).await.map_err(|e| fail(e.into()))?;
    if response.status() != StatusCode::OK {
        return Err(fail(format!("http {}", response.status().as_u16()).into()));
    }
    let part = path.with_extension("part");
    let mut file = tokio::fs::File::create(&part)
        .await
        .map_err(|e| DownloadError::new(part.display().to_string(), e))?;
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| fail(e.into()))?;
        if let Ok(data) = frame.into_data() {
            file.write_all(&data)
                .await
                .map_err(|e| DownloadError::new(part.display().to_string(), e))?;
        }
    }
    file.sync_all()
        .await
        .map_err(|e| DownloadError::new(part.display().to_string(), e))?;
    drop(file);
    tokio::fs::rename(&part, path)
        .await
        .map_err(|e| DownloadError::new(path.display().to_string(), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_safe_and_keep_the_extension() {
        assert_eq!(file_name(0, "http://h/outputs/1/0.mp4"), "0.mp4");
        assert_eq!(file_name(2, "http://h/x?sig=1"), "2.bin");
        assert_eq!(file_name(1, "http://h/a.p/ng"), "1.bin");
        assert_eq!(dir_name("a/b c"), "a_b_c");
        assert_eq!(dir_name(".."), "job..");
    }
}
